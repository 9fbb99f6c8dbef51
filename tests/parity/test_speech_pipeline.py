"""End-to-end speech vs the reference's `Qwen3OmniMoeForConditionalGeneration.generate(return_audio=True)`.

Tiny preset, fp32, one reference model (thinker + talker + Code2Wav, re-drawn weights, a well-scaled
vocoder) converted through the strict converter with `model_specs`. The reference runs its whole
pipeline greedily (`thinker_do_sample=False`, `talker_do_sample=False`: the code predictor follows the
talker); `speech.speak` gets the reference thinker's prompt states and sequences (what
`model.generate` captures on our side) and must give the same codec frames, id for id, and the same
waveforms (max |error| <= 1e-5 x max |reference|), in batches of 2 whose rows stop at different
steps:

* a text-only batch (rows of different prompt lengths, thinker EOS and codec EOS at different steps);
* an image prompt beside a text row whose thinker answer is EOS at once (talker positions from
  `get_rope_index` over the talker's ids with the image grid);
* a single row (the reference's unbatched path, which does not trim).

Both sides get `talker_suppress_tokens = [32, vocab)` (every id that is not a codebook-0 code; for the
tiny talker's 32 + 1024 ids this is the reference's default window with EOS no longer exempt, since the
EOS is picked among the codes). The reference's talker runs under
`convert.reference.talker_penalty_over_all_generated_tokens`: its batched repetition penalty otherwise
skips a left-padded row's first codes, which its single-row path (and ours) does not. The EOS ids (thinker and codec) are chosen among what the greedy
models emit, so that rows stop at different steps; both sides get the same ids.

Streaming: `stream_speak` yields per row exactly the seamless full decode of the same frames.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.reference import talker_penalty_over_all_generated_tokens
from omni_jax import code2wav, speech, talker
from omni_jax.config import preset
from tests.conftest import FP32
from tests.parity.test_talker_parity import _left_pad, _pick_eos

# max |difference| <= 1e-5 x max |reference| (measured: ~5e-7 for every waveform).
TOLERANCE = 1e-5
NEWLINE = 198
THINKER_NEW_TOKENS = 10
MAX_FRAMES = 15  # the reference's talker_max_new_tokens = 16
IMAGE_GRID = (1, 4, 4)  # 16 patches -> 4 image tokens after the 2 x 2 merge


@functools.lru_cache(maxsize=None)
def _model():
    """(config, fp32 reference, our params) — every component, through the strict converter."""
    from convert.hf_to_jax import convert_tensors
    from convert.reference import randomize_, reference_model, state_dict_tensors
    from omni_jax.model import model_specs
    from omni_jax.nn.params import unflatten
    from tests.parity.test_code2wav_parity import _randomize as randomize_vocoder

    config = preset("tiny")
    ref = reference_model(config, seed=0)
    randomize_(ref, 0)
    randomize_vocoder(ref.code2wav, 1)
    params = unflatten(convert_tensors(state_dict_tensors(ref), model_specs(config), dtype="float32"))
    return config, ref, jax.tree.map(jnp.asarray, params)


def _suppress(config):
    tc = config.talker_config
    return tuple(range(tc.code_predictor_config.vocab_size, tc.text_config.vocab_size))


def _rows(config, kind: str):
    c, tc = config, config.thinker_config
    rng = np.random.default_rng(3)

    def turn(role, body):
        return [c.im_start_token_id, role, NEWLINE] + body + [c.im_end_token_id, NEWLINE]

    def text(n):
        return [int(t) for t in rng.integers(0, 400, n)]

    reply = [c.im_start_token_id, c.assistant_token_id, NEWLINE]
    if kind == "text":
        return [turn(c.system_token_id, text(2)) + turn(c.user_token_id, text(6)) + reply,
                turn(c.user_token_id, text(2)) + reply]
    n_image = int(np.prod(IMAGE_GRID)) // 4
    image = [tc.vision_start_token_id] + [tc.image_token_id] * n_image + [tc.vision_end_token_id]
    return [turn(c.user_token_id, text(2) + image + text(3)) + reply, turn(c.user_token_id, text(4)) + reply]


def _media(kind: str) -> dict:
    if kind != "image":
        return {}
    t, h, w = IMAGE_GRID
    pixels = np.random.default_rng(5).standard_normal((t * h * w, 3 * 2 * 16 * 16)).astype(np.float32)
    return {"pixel_values": pixels, "image_grid_thw": np.array([IMAGE_GRID], np.int64)}


@contextlib.contextmanager
def _one_thread():
    """Torch on one thread while the reference runs: its tiny matmuls are ~30x slower with two threads on a
    loaded 2-core machine (thread hand-offs dominate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _reference_generate(ref, ids, mask, media, thinker_eos, codec_eos, suppress):
    """The reference's full speech generation; captures its thinker result and the codes it decodes."""
    captured = {}
    thinker_generate, talker_generate = ref.thinker.generate, ref.talker.generate
    chunked_decode = ref.code2wav.chunked_decode

    def thinker_spy(*a, **k):
        captured["thinker"] = thinker_generate(*a, **k)
        return captured["thinker"]

    def talker_spy(*a, **k):
        with talker_penalty_over_all_generated_tokens():
            captured["talker"] = talker_generate(*a, **k)
        return captured["talker"]

    def decode_spy(codes, **k):
        captured["codes"] = codes.clone().numpy()
        return chunked_decode(codes, **k)

    ref.thinker.generate, ref.talker.generate, ref.code2wav.chunked_decode = thinker_spy, talker_spy, decode_spy
    try:
        with torch.no_grad():
            sequences, wavs = ref.generate(
                input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), return_audio=True, speaker="Chelsie",
                thinker_max_new_tokens=THINKER_NEW_TOKENS, thinker_eos_token_id=thinker_eos, thinker_do_sample=False,
                talker_do_sample=False, talker_max_new_tokens=MAX_FRAMES + 1, talker_suppress_tokens=list(suppress),
                talker_eos_token_id=codec_eos, **{k: torch.tensor(v) for k, v in media.items()},
            )
    finally:
        del ref.thinker.generate, ref.talker.generate, ref.code2wav.chunked_decode
    wavs = [w.reshape(-1).numpy() for w in (wavs if isinstance(wavs, list) else list(wavs))]
    return captured, sequences.numpy(), wavs


@functools.lru_cache(maxsize=None)
def _scenario(kind: str):
    """Reference runs with EOS ids chosen so that rows stop at different steps. kind: "text", "image",
    or "single" (row 0 of "text" alone, with the text scenario's EOS ids: the reference's unbatched path)."""
    config, ref, _ = _model()
    suppress = _suppress(config)
    if kind == "single":
        text = _scenario("text")
        ids, mask = _left_pad(_rows(config, "text")[:1])
        with _one_thread():
            captured, sequences, wavs = _reference_generate(ref, ids, mask, {}, text["thinker_eos"], text["codec_eos"],
                                                            suppress)
        return dict(ids=ids, mask=mask, media={}, suppress=suppress, thinker_eos=text["thinker_eos"],
                    codec_eos=text["codec_eos"], thinker=captured["thinker"], codes=captured["codes"],
                    talker_tokens=captured["talker"].sequences.numpy(), sequences=sequences, wavs=wavs)
    ids, mask = _left_pad(_rows(config, kind))
    media = _media(kind)
    with _one_thread():
        # EOS-free runs first (-1 never matches), then the EOS ids among what the greedy models emit.
        captured, _, _ = _reference_generate(ref, ids, mask, media, -1, -1, suppress)
        generated = captured["thinker"].sequences.numpy()[:, ids.shape[1]:]
        if kind == "image":
            # Row 1 answers with EOS at once: its first token, which row 0 does not emit early.
            thinker_eos = int(generated[1, 0])
            assert thinker_eos not in generated[0, :3].tolist(), "pick another seed"
        else:
            thinker_eos = _pick_eos(generated)
            assert thinker_eos is not None, "no thinker EOS candidate; change the seed"
        captured, _, _ = _reference_generate(ref, ids, mask, media, thinker_eos, -1, suppress)
        codec_eos = _pick_eos(captured["codes"][:, 0])
        assert codec_eos is not None, "no codec EOS candidate; change the seed"
        captured, sequences, wavs = _reference_generate(ref, ids, mask, media, thinker_eos, codec_eos, suppress)
    return dict(ids=ids, mask=mask, media=media, suppress=suppress, thinker_eos=thinker_eos, codec_eos=codec_eos,
                thinker=captured["thinker"], codes=captured["codes"],
                talker_tokens=captured["talker"].sequences.numpy(), sequences=sequences, wavs=wavs)


def _speak_kwargs(sc, rows=None):
    """Our arguments from the reference thinker's result: the prompt states (hidden_states of the prefill
    step: the input embeddings with the image features in place, and layer accept_hidden_layer).
    rows: which rows to run (default: all), e.g. [0, 0] to run one row as a batch of two."""
    config, _, _ = _model()
    prefill = sc["thinker"].hidden_states[0]
    rows = list(range(sc["ids"].shape[0])) if rows is None else rows
    multimodal = {k: v for k, v in sc["media"].items() if k != "pixel_values"}
    return dict(
        prompt_ids=sc["ids"][rows], prompt_mask=sc["mask"][rows], sequences=sc["sequences"][rows],
        thinker_embeds=prefill[0].numpy()[rows],
        thinker_hidden=prefill[config.talker_config.accept_hidden_layer].numpy()[rows],
        speakers="Chelsie", greedy=True, max_frames=MAX_FRAMES, multimodal=multimodal,
        thinker_eos_token_id=sc["thinker_eos"], suppress_tokens=sc["suppress"], codec_eos_token_id=sc["codec_eos"],
    )


# Every run of ours below is a batch of two rows with the same static talker shapes (the user part and
# the trailing text fit one bucket each), so the talker loop and Code2Wav compile once.
BATCH = 2


@functools.lru_cache(maxsize=None)
def _ours(kind: str, chunked: bool = True):
    """Ours on a scenario; "single" runs its row twice (a batch of two; both rows must match)."""
    config, _, params = _model()
    sc = _scenario(kind)
    rows = [0, 0] if kind == "single" else None
    return speech.speak(params, config, FP32, chunked=chunked, **_speak_kwargs(sc, rows))


def _reference_codes(sc):
    """Per row (Q, frames before the codec EOS), as the reference cuts them (its talker's tokens: token k
    is frame k's codebook-0 id, the codec EOS ends the row)."""
    codes, tokens = sc["codes"], sc["talker_tokens"]
    out = []
    for row, toks in zip(codes, tokens):
        hits = np.nonzero(toks[: row.shape[1]] == sc["codec_eos"])[0]
        out.append(row[:, : hits[0] if hits.size else row.shape[1]])
    return out


def _expand(kind, expected):
    return expected * BATCH if kind == "single" else expected


@pytest.mark.parametrize("kind", ["text", "image", "single"])
def test_codes_equal_the_reference(kind):
    sc = _scenario(kind)
    ours = _ours(kind)
    expected = _expand(kind, _reference_codes(sc))
    assert len(ours.codes) == len(expected) == BATCH
    for row, (got, exp) in enumerate(zip(ours.codes, expected)):
        np.testing.assert_array_equal(got, exp, err_msg=f"{kind} row {row}")
    lengths = [c.shape[1] for c in ours.codes]
    assert min(lengths) >= 2
    if kind != "single":
        assert len(set(lengths)) > 1, "rows end at different frames"
        generated = sc["sequences"][:, sc["ids"].shape[1]:]
        firsts = [int(np.argmax(g == sc["thinker_eos"])) if (g == sc["thinker_eos"]).any() else len(g)
                  for g in generated]
        assert len(set(firsts)) > 1, "thinker rows end at different steps"
        if kind == "image":
            assert firsts[1] == 0, "row 1's thinker answer is EOS at once"


@pytest.mark.parametrize("kind", ["text", "image", "single"])
def test_waveforms_match(kind):
    sc = _scenario(kind)
    ours = _ours(kind)
    expected = _expand(kind, sc["wavs"])
    assert len(ours.audio) == len(expected)
    for row, (got, exp) in enumerate(zip(ours.audio, expected)):
        assert got.dtype == np.float32 and got.shape == exp.shape, (kind, row, got.shape, exp.shape)
        scale = np.abs(exp).max()
        assert scale > 1e-3, "a silent reference proves nothing"
        err = np.abs(got - exp).max()
        assert err <= TOLERANCE * scale, f"{kind} row {row}: max error {err:.3g} vs scale {scale:.3g}"


def test_image_prompt_needs_the_media_positions():
    """The image row's codes depend on the talker's M-RoPE image positions: with 1-D text positions
    (no grid passed) they differ from the reference's."""
    config, _, params = _model()
    sc = _scenario("image")
    kwargs = _speak_kwargs(sc)
    kwargs["multimodal"] = {}
    text_positions = speech.speak(params, config, FP32, **kwargs)
    expected = _reference_codes(sc)[0]
    assert text_positions.codes[0].shape != expected.shape or not np.array_equal(text_positions.codes[0], expected)


def test_streaming_equals_the_seamless_decode():
    """`stream_speak` in chunks of 4 frames: per row, the concatenated audio is the full causal decode of
    the row's frames (`speak(chunked=False)`), each row ends once with `final`, and it streams: a row of
    F frames arrives in ceil(F / 4) pieces of audio."""
    config, _, params = _model()
    sc = _scenario("text")
    full = _ours("text", chunked=False)
    chunks = list(speech.stream_speak(params, config, FP32, chunk_frames=4, **_speak_kwargs(sc)))
    cfg = config.code2wav_config
    for row in range(BATCH):
        mine = [c for c in chunks if c.row == row]
        assert [c.final for c in mine].count(True) == 1 and mine[-1].final
        audio = np.concatenate([c.audio for c in mine])
        expected = full.audio[row]
        assert expected.shape == (code2wav.output_length(cfg, full.codes[row].shape[1]),)
        assert audio.shape == expected.shape, (row, audio.shape, expected.shape)
        scale = np.abs(expected).max()
        assert np.abs(audio - expected).max() <= TOLERANCE * scale
        frames = full.codes[row].shape[1]
        assert sum(c.audio.size > 0 for c in mine) == -(-frames // 4), (row, frames, [c.audio.size for c in mine])
    assert max(c.shape[1] for c in full.codes) > 4, "a row long enough to stream in several pieces"
    # The seamless decode keeps the samples the reference's chunked decode cuts at each call's end.
    assert full.audio[0].shape[0] == _ours("text").audio[0].shape[0]  # one chunk (< 300 frames): same length
    np.testing.assert_array_equal(full.codes[0], _ours("text").codes[0])


def test_answer_of_one_token():
    """A prompt whose whole answer is the EOS token: the reference fails on it alone (its 9-position prefix
    needs the first reply token's embedding, which it never computed); we speak it as the batched
    reference speaks such a row (image scenario, row 1)."""
    config, ref, params = _model()
    sc = _scenario("image")
    pad = int((sc["mask"][1] == 0).sum())
    ids, mask = sc["ids"][1:, pad:], sc["mask"][1:, pad:]
    with _one_thread(), pytest.raises(RuntimeError, match="size of tensor"):
        _reference_generate(ref, ids, mask, {}, sc["thinker_eos"], sc["codec_eos"], sc["suppress"])
    kwargs = _speak_kwargs(sc, [1, 1])
    prefill = sc["thinker"].hidden_states[0]
    kwargs.update(
        prompt_ids=np.repeat(ids, 2, 0), prompt_mask=np.repeat(mask, 2, 0),
        sequences=np.repeat(np.concatenate([ids, [[sc["thinker_eos"]]]], 1), 2, 0),
        thinker_embeds=np.repeat(prefill[0].numpy()[1:, pad:], 2, 0),
        thinker_hidden=np.repeat(prefill[config.talker_config.accept_hidden_layer].numpy()[1:, pad:], 2, 0),
        multimodal={},
    )
    out = speech.speak(params, config, FP32, **kwargs)
    batched = _ours("image")
    for row in range(BATCH):
        np.testing.assert_array_equal(out.codes[row], batched.codes[1])
        scale = np.abs(batched.audio[1]).max()
        assert out.audio[row].shape == batched.audio[1].shape
        assert np.abs(out.audio[row] - batched.audio[1]).max() <= TOLERANCE * scale


def test_talker_positions_for_audio_and_image():
    """Audio + image in a user turn: the reference's talker `get_rope_index` reads a talker `audio_config`
    that does not exist; ours equals the reference *thinker's* `get_rope_index` on the talker's ids."""
    config, ref, _ = _model()
    c, tc = config, config.thinker_config
    n_image = int(np.prod(IMAGE_GRID)) // 4
    audio = [tc.audio_start_token_id] + [tc.audio_token_id] * 13 + [tc.audio_end_token_id]  # 100 mel frames
    image = [tc.vision_start_token_id] + [tc.image_token_id] * n_image + [tc.vision_end_token_id]
    rows = [[c.im_start_token_id, c.user_token_id, NEWLINE, 7] + audio + [8] + image + [9, c.im_end_token_id, NEWLINE,
             c.im_start_token_id, c.assistant_token_id, NEWLINE],
            [c.im_start_token_id, c.user_token_id, NEWLINE] + image + [c.im_end_token_id, NEWLINE, c.im_start_token_id,
             c.assistant_token_id, NEWLINE]]
    ids, mask = _left_pad(rows)
    plan = talker.plan_talker_inputs(ids, mask, np.concatenate([ids, np.full((2, 3), 5)], 1), config)
    grid = np.array([IMAGE_GRID, IMAGE_GRID], np.int64)
    fam = np.ones((1, 100), np.int64)
    ours = speech.talker_position_ids(plan.input_ids, plan.attention_mask, config,
                                      {"image_grid_thw": grid, "feature_attention_mask": fam})
    args = (torch.tensor(plan.input_ids).long(), torch.tensor(grid), None, torch.tensor(plan.attention_mask))
    with pytest.raises(AttributeError, match="audio_config"):
        ref.talker.get_rope_index(*args, False, torch.tensor([100]))
    expected, _ = ref.thinker.get_rope_index(*args, False, torch.tensor([100]))
    valid = plan.attention_mask.astype(bool)
    np.testing.assert_array_equal(ours[:, valid], expected.numpy()[:, valid])
    assert not np.array_equal(ours, talker.text_position_ids(plan.attention_mask))


def test_errors():
    config, _, params = _model()
    kwargs = _speak_kwargs(_scenario("text"))
    with pytest.raises(ValueError, match="unknown speaker 'Bob'; valid speakers: aiden, chelsie, ethan"):
        speech.speak(params, config, FP32, **{**kwargs, "speakers": ["Ethan", "Bob"]})
    with pytest.raises(ValueError, match="one name or one per row"):
        speech.speak(params, config, FP32, **{**kwargs, "speakers": ["Ethan"] * 3})
    text_only = config.replace(talker_config=None, code2wav_config=None, enable_audio_output=False)
    with pytest.raises(ValueError, match="no talker/Code2Wav"):
        speech.speak(params, text_only, FP32, **kwargs)
    with pytest.raises(ValueError, match="must start with prompt_ids"):
        speech.speak(params, config, FP32, **{**kwargs, "sequences": kwargs["sequences"][::-1]})


def test_codec_eos_at_once_gives_empty_audio():
    """Suppressing every talker id but the codec EOS (as the reference's default window does for a talker
    vocabulary under 1024 + codebook size): every row ends before its first frame (the reference then
    fails stacking zero frames). We return empty audio and (Q, 0) codes, offline and streamed."""
    config, _, params = _model()
    tc = config.talker_config
    only_eos = tuple(i for i in range(tc.text_config.vocab_size) if i != tc.codec_eos_token_id)
    kwargs = {**_speak_kwargs(_scenario("text")), "suppress_tokens": only_eos, "codec_eos_token_id": None}
    out = speech.speak(params, config, FP32, **kwargs)
    groups = config.talker_config.num_code_groups
    assert [c.shape for c in out.codes] == [(groups, 0)] * BATCH
    assert [a.shape for a in out.audio] == [(0,)] * BATCH
    chunks = list(speech.stream_speak(params, config, FP32, chunk_frames=4, **kwargs))
    assert [(c.row, c.audio.shape, c.final) for c in chunks] == [(r, (0,), True) for r in range(BATCH)]
