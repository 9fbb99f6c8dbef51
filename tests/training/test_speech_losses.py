"""Speech losses (talker codebook-0 CE, code-predictor CE) with teacher forcing: consistency with
inference, the PyTorch reference, gradients, and a tiny overfit.

The decisive check: speak with the existing pipeline (`speech.prepare_talker` + `talker.start` /
`talker.advance`, greedy and sampled, on the tiny preset with the reference's re-drawn weights), capture
the talker state behind every codebook-0 token, then feed the generated codes back as targets: the
teacher-forced talker states and logits equal the generation-time ones at every frame (the EOS position
included), and the code predictor's teacher-forced logits equal those of the frame's generation state
(greedy: their argmax is the generated residual code). The rows hold a system turn, an earlier
assistant turn (both dropped), audio and image placeholders (`hidden_projection`; TM-RoPE positions
with an image grid), replies of different lengths (the talker runs past the text: `tts_eos`, then
`tts_pad`) and right padding; a third row has no speech. fp32; max |difference| <= 1e-5 x max |expected|
(measured: talker states/logits vs generation 3e-7, code predictor 6e-7; vs the PyTorch reference 4e-7).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from omni_jax import code_predictor as cp
from omni_jax import positions, speech, talker
from omni_jax.training import speech_losses as sl
from tests.conftest import FP32
from tests.parity.test_code_predictor_parity import _reference_teacher_forced, talker_reference

TOLERANCE = 1e-5
NEWLINE = 198
MAX_FRAMES = 10
AUDIO_MEL_FRAMES = 32  # -> 4 audio tokens
IMAGE_GRID = (1, 4, 4)  # 16 patches -> 4 image tokens after the 2 x 2 merge
SEQ = 40  # the training bucket


def _close(got, expected, what=""):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    scale = np.abs(expected).max()
    err = np.abs(got - expected).max()
    assert err <= TOLERANCE * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@functools.lru_cache(maxsize=None)
def _model():
    """(config, reference, params): the tiny talker through the strict converter and the thinker's embedding
    table (all that the talker reads from the thinker's parameters)."""
    config, ref, talker_params = talker_reference("tiny")
    table = jnp.asarray(ref.thinker.get_input_embeddings().weight.detach().numpy())
    return config, ref, {"thinker": {"model": {"embed_tokens": {"weight": table}}}, "talker": talker_params}


def _suppress(config):
    tc = config.talker_config
    return tuple(range(tc.code_predictor_config.vocab_size, tc.text_config.vocab_size))


@functools.lru_cache(maxsize=None)
def _rows():
    """Token rows (prompt + reply + <|im_end|>\\n) and where each reply starts / ends."""
    config, _, _ = _model()
    c, tc = config, config.thinker_config
    rng = np.random.default_rng(7)

    def turn(role, body):
        return [c.im_start_token_id, role, NEWLINE] + body + [c.im_end_token_id, NEWLINE]

    def text(n):
        return [int(t) for t in rng.integers(0, 400, n)]

    audio = [tc.audio_start_token_id] + [tc.audio_token_id] * 4 + [tc.audio_end_token_id]
    image = [tc.vision_start_token_id] + [tc.image_token_id] * 4 + [tc.vision_end_token_id]
    reply = [c.im_start_token_id, c.assistant_token_id, NEWLINE]
    prompts = [
        turn(c.system_token_id, text(2)) + turn(c.user_token_id, text(2) + audio + text(2)) + reply,
        turn(c.user_token_id, image) + turn(c.assistant_token_id, text(1)) + turn(c.user_token_id, []) + reply,
        turn(c.user_token_id, text(4)) + reply,  # no speech target
    ]
    answers = [text(5), text(3), text(2)]
    return [(p, a + [c.im_end_token_id, NEWLINE]) for p, a in zip(prompts, answers)]


@functools.lru_cache(maxsize=None)
def _thinker_batch():
    """Right-padded training rows, thinker TM-RoPE positions, and stand-in thinker states: token embeddings
    plus noise at the media placeholders (as encoder features would be), random `accept_hidden_layer` states."""
    config, _, params = _model()
    rows = [p + a for p, a in _rows()]
    ids = np.zeros((len(rows), SEQ), np.int32)
    mask = np.zeros((len(rows), SEQ), np.int32)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
        mask[r, : len(row)] = 1
    assert positions.audio_output_lengths(np.array([AUDIO_MEL_FRAMES]))[0] == 4
    pos, _ = positions.position_ids_for_inputs(
        ids, mask, config.thinker_config, image_grid_thw=np.array([IMAGE_GRID]),
        audio_feature_lengths=np.array([AUDIO_MEL_FRAMES]),
    )
    rng = np.random.default_rng(11)
    table = np.asarray(params["thinker"]["model"]["embed_tokens"]["weight"])
    tc = config.thinker_config
    media = np.isin(ids, [tc.audio_token_id, tc.image_token_id])
    embeds = table[ids] + media[..., None] * rng.normal(size=(*ids.shape, table.shape[1])).astype(np.float32)
    hidden = rng.normal(size=embeds.shape).astype(np.float32)
    return ids, mask, pos, embeds.astype(np.float32), hidden


def _multimodal(row: int) -> dict:
    return [{"audio_feature_lengths": np.array([AUDIO_MEL_FRAMES])}, {"image_grid_thw": np.array([IMAGE_GRID])}][row]


class _Generated:
    def __init__(self, codes, hidden, cp_hidden, run):
        self.codes, self.hidden, self.cp_hidden, self.run = codes, hidden, cp_hidden, run


@functools.lru_cache(maxsize=None)
def _speak(row: int, greedy: bool, seed: int = 0) -> _Generated:
    """The inference pipeline on one row (an unbatched reference call), one frame per `advance`, capturing
    the talker's last hidden state after the prefill and after every step (the state behind each c0)."""
    config, _, params = _model()
    tc = config.talker_config
    ids, _, _, embeds, hidden = _thinker_batch()
    prompt, answer = _rows()[row]
    s = len(prompt)
    sequence = np.array([prompt + answer[: answer.index(config.im_end_token_id) + 1]])
    run = speech.prepare_talker(
        params, config, FP32, prompt_ids=ids[row: row + 1, :s], prompt_mask=None, sequences=sequence,
        thinker_embeds=embeds[row: row + 1, :s], thinker_hidden=hidden[row: row + 1, :s], speakers="Chelsie",
        greedy=greedy, seed=seed, max_frames=MAX_FRAMES, multimodal=_multimodal(row),
        suppress_tokens=_suppress(config),
    )
    kwargs = dict(cfg=tc, rt=FP32, sampling=run.sampling)
    state = talker.start(params["talker"], run.inputs.embeds, run.inputs.attention_mask,
                         jnp.asarray(run.position_ids), run.key, run.suppress, jnp.int32(run.eos),
                         max_new_tokens=run.max_new_tokens, **kwargs)
    states = [np.asarray(state.last_hidden)[0]]
    for step in range(1, MAX_FRAMES + 1):
        if bool(state.done[0]):
            break
        state = talker.advance(params["talker"], state, run.inputs.trailing, run.inputs.tts_pad, run.suppress,
                               jnp.int32(run.eos), jnp.int32(step), cp_sampling=run.cp_sampling, **kwargs)
        states.append(np.asarray(state.last_hidden)[0])
    out = talker.collect_codes(state, run.eos)
    frames = int(out.lengths[0])
    codes = out.codes[0, :, :frames].T  # (frames, G)
    states = np.stack(states)
    # A row that emitted the EOS has the state behind it; one that ran to MAX_FRAMES has the state after.
    assert states.shape[0] == frames + 1, (states.shape, frames)
    return _Generated(codes, states, states[:frames], run)


def _training_batch(generated: list[_Generated]) -> dict:
    config, _, _ = _model()
    tc = config.talker_config
    ids, mask, pos, _, _ = _thinker_batch()
    b = ids.shape[0]
    codec_ids = np.zeros((b, MAX_FRAMES, tc.num_code_groups), np.int32)
    codec_mask = np.zeros((b, MAX_FRAMES), np.int32)
    for r, g in enumerate(generated):
        codec_ids[r, : g.codes.shape[0]] = g.codes
        codec_mask[r, : g.codes.shape[0]] = 1
    speaker = np.full((b,), talker.speaker_token_id(tc, "Chelsie"), np.int32)
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos, codec_ids=codec_ids, codec_mask=codec_mask,
                speaker=speaker)


@functools.lru_cache(maxsize=None)
def _grad_fn():
    """The one compiled program of this file: `speech_losses` (as `speech_logits` + `losses_from_logits`, so
    the logits come out too) and its gradient w.r.t. the parameters and both thinker state arrays."""
    config, _, _ = _model()

    def loss(p, e, h, batch):
        out = sl.speech_logits(p, e, h, batch, config, FP32)
        talker_ce, cp_ce, metrics = sl.losses_from_logits(out, batch, config)
        return talker_ce + cp_ce, (talker_ce, cp_ce, metrics, out)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _run(batch):
    """((talker_ce, cp_ce, metrics, SpeechLogits), (grad params, grad embeds, grad hidden)) on the test rows."""
    _, _, params = _model()
    _, _, _, embeds, hidden = _thinker_batch()
    (_, aux), grads = _grad_fn()(params, embeds, hidden, batch)
    return aux, grads


@functools.lru_cache(maxsize=None)
def _cp_fn():
    config, _, _ = _model()
    return jax.jit(lambda p, h, first, codes: cp.teacher_forced_logits(
        p, h, first, codes, config.talker_config.code_predictor_config, FP32))


def _pad_frames(x):
    return np.concatenate([x, np.zeros((MAX_FRAMES - x.shape[0], *x.shape[1:]), x.dtype)])


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_teacher_forcing_equals_generation(greedy):
    config, _, params = _model()
    tc = config.talker_config
    generated = [_speak(0, greedy, seed=1), _speak(1, greedy, seed=2)]
    for g in generated:
        assert g.codes.shape[0] >= 3
    if not greedy:
        assert all(len({tuple(f) for f in g.codes}) > 1 for g in generated), "sampled frames vary"
    batch = _training_batch(generated)
    sl.check_speech_targets(batch, config)
    (_, _, _, out), _ = _run(batch)
    np.testing.assert_array_equal(np.asarray(out.inputs.has_reply), [True, True, True])
    for r, g in enumerate(generated):
        frames = g.codes.shape[0]
        _close(np.asarray(out.talker_hidden)[r, : frames + 1], g.hidden, f"row {r} talker states")
        expected_logits = g.hidden @ np.asarray(params["talker"]["codec_head"]["kernel"])
        _close(np.asarray(out.talker)[r, : frames + 1], expected_logits, f"row {r} codebook-0 logits")
        # The code predictor from the generation-time state and the true codes.
        # (padded to MAX_FRAMES frames: one compilation)
        first = np.asarray(params["talker"]["model"]["codec_embedding"]["weight"])[g.codes[:, 0]]
        expected_cp = np.asarray(_cp_fn()(params["talker"]["code_predictor"], _pad_frames(g.cp_hidden),
                                          _pad_frames(first), _pad_frames(g.codes[:, 1:])))[:frames]
        got_cp = np.asarray(out.code_predictor)[r, :frames]
        _close(got_cp, expected_cp, f"row {r} code-predictor logits")
        if greedy:
            np.testing.assert_array_equal(got_cp.argmax(-1), g.codes[:, 1:])
            # Greedy codebook 0: argmax after suppression and the repetition penalty (1.05) of earlier tokens.
            logits = np.asarray(out.talker)[r, :frames].copy()
            logits[:, list(_suppress(config))] = -np.inf
            for k in range(frames):
                seen = np.unique(g.codes[:k, 0])
                logits[k, seen] = np.where(logits[k, seen] > 0, logits[k, seen] / 1.05, logits[k, seen] * 1.05)
            np.testing.assert_array_equal(logits.argmax(-1), g.codes[:, 0])


def test_teacher_forced_positions_equal_inference():
    """Talker prompt and frame positions (TM-RoPE with the image grid; audio; a dropped system turn and
    assistant turn) equal what inference computes on the talker's own ids."""
    config, _, params = _model()
    generated = [_speak(0, True, seed=1), _speak(1, True, seed=2)]
    (_, _, _, out), _ = _run(_training_batch(generated))
    seq = out.inputs
    for r, g in enumerate(generated):
        run = g.run
        u9 = run.position_ids.shape[2]
        valid = run.inputs.attention_mask[0].astype(bool)
        prompt_cols = seq.attention_mask.shape[1] - MAX_FRAMES
        got = np.asarray(seq.position_ids)[:, r, prompt_cols - u9: prompt_cols]
        np.testing.assert_array_equal(got[:, valid], run.position_ids[:, 0, valid])
        frames = np.asarray(seq.position_ids)[:, r, prompt_cols:]
        np.testing.assert_array_equal(frames, run.position_ids[:, 0, -1:] + 1 + np.arange(MAX_FRAMES))
        _close(np.asarray(seq.embeds)[r, prompt_cols - u9: prompt_cols][valid], np.asarray(run.inputs.embeds)[0][valid],
               f"row {r} talker prompt")
        if r == 1:  # the image row: T, H and W differ
            assert len({tuple(x) for x in got[:, valid].T if len(set(x)) > 1}) > 1


def test_talker_logits_equal_the_reference_forward():
    """The same teacher-forced inputs_embeds through the PyTorch reference talker and code predictor: logits,
    and the talker's load-balancing loss."""
    config, ref, params = _model()
    generated = [_speak(0, False, seed=1), _speak(1, False, seed=2)]
    (_, _, metrics, out), _ = _run(_training_batch(generated))
    seq = out.inputs
    with torch.no_grad():
        ref.talker.rope_deltas = None
        ref_out = ref.talker(
            inputs_embeds=torch.tensor(np.asarray(seq.embeds)),
            attention_mask=torch.tensor(np.asarray(seq.attention_mask)),
            position_ids=torch.tensor(np.asarray(seq.position_ids)).long(),
            output_router_logits=True,
        )
        expected = ref_out.logits.numpy()[:, -MAX_FRAMES - 1:]
    # The talker's MoE load-balancing loss is the reference talker's `aux_loss` on the same sequence.
    np.testing.assert_allclose(float(metrics["talker_aux_loss"]), ref_out.aux_loss.item(), rtol=1e-5)
    for r, g in enumerate(generated):
        frames = g.codes.shape[0]
        _close(np.asarray(out.talker)[r, : frames + 1], expected[r, : frames + 1], f"row {r} vs reference talker")
        hidden_r = torch.tensor(np.asarray(out.talker_hidden)[r, :frames])
        with torch.no_grad():
            first = ref.talker.model.codec_embedding(torch.tensor(g.codes[:, 0]))
        prefix = torch.cat([hidden_r[:, None], first[:, None]], 1)
        _close(np.asarray(out.code_predictor)[r, :frames], _reference_teacher_forced(ref, prefix, g.codes[:, 1:]),
               f"row {r} vs reference code predictor")


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_values_and_masking():
    """The CEs are the masked means of -log softmax at the targets (codes, then the codec EOS); the row
    without speech adds nothing; an all-silent batch gives 0; `speech_losses` is the composition."""
    config, _, params = _model()
    tc = config.talker_config
    generated = [_speak(0, False, seed=1), _speak(1, False, seed=2)]
    batch = _training_batch(generated)
    (talker_ce, cp_ce, metrics, out), _ = _run(batch)
    nll0, nll1 = [], []
    for r, g in enumerate(generated):
        frames = g.codes.shape[0]
        logp = _log_softmax(np.asarray(out.talker, np.float64)[r, : frames + 1])
        targets = np.append(g.codes[:, 0], tc.codec_eos_token_id)
        nll0 += list(-logp[np.arange(frames + 1), targets])
        logp = _log_softmax(np.asarray(out.code_predictor, np.float64)[r, :frames])
        nll1 += list(-np.take_along_axis(logp, g.codes[:, 1:, None], -1).ravel())
    np.testing.assert_allclose(float(talker_ce), np.mean(nll0), rtol=1e-5)
    np.testing.assert_allclose(float(cp_ce), np.mean(nll1), rtol=1e-5)
    assert float(metrics["talker_targets"]) == len(nll0) and float(metrics["code_predictor_targets"]) == len(nll1)
    assert float(metrics["speech_rows"]) == 2
    direct = sl.losses_from_logits(out, batch, config)
    assert float(direct[0]) == float(talker_ce) and float(direct[1]) == float(cp_ce)
    silent = dict(batch, codec_mask=np.zeros_like(batch["codec_mask"]))
    (talker_ce, cp_ce, metrics, _), grads = _run(silent)
    assert float(talker_ce) == 0.0 and float(cp_ce) == 0.0 and float(metrics["talker_targets"]) == 0
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(grads))


def test_gradients_reach_every_talker_parameter_and_the_thinker_states():
    config, _, params = _model()
    batch = _training_batch([_speak(0, False, seed=1), _speak(1, False, seed=2)])
    ids = batch["input_ids"]
    _, grads = _run(batch)
    g_params, g_embeds, g_hidden = (jax.tree.map(np.asarray, x) for x in grads)
    flat = jax.tree_util.tree_flatten_with_path(g_params["talker"])[0]
    assert len(flat) == len(jax.tree.leaves(params["talker"]))
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        assert np.isfinite(leaf).all(), name
        assert np.abs(leaf).max() > 0, f"no gradient for talker{name}"
    table = g_params["thinker"]["model"]["embed_tokens"]["weight"]
    # The thinker's table: only the tts_bos/eos/pad rows are read here (the token embeddings come in as states).
    np.testing.assert_array_equal(np.nonzero(np.abs(table).max(-1))[0], np.sort(talker.tts_token_ids(config)))
    # Thinker states: embeddings of the user turns and the spoken reply; hidden states at media placeholders
    # of user turns only; nothing at the dropped system/assistant turns, the reply's EOS and after, padding,
    # nor at the row without speech.
    tc = config.thinker_config
    is_media = np.isin(ids, [tc.audio_token_id, tc.image_token_id])
    assert np.isfinite(g_embeds).all() and np.isfinite(g_hidden).all()
    assert (np.abs(g_hidden).max(-1) > 0).tolist() == (is_media & (np.arange(3) < 2)[:, None]).tolist()
    read = np.abs(g_embeds).max(-1) > 0
    for r, (prompt, answer) in enumerate(_rows()):
        reply_end = len(prompt) + answer.index(config.im_end_token_id)  # the EOS: never read
        if r == 2:
            assert not read[r].any()
            continue
        assert read[r, len(prompt) - 3: reply_end].all() and not read[r, reply_end:].any()
    assert not read[0, :7].any()  # the system turn
    assert read[0, 7:22].sum() == 15 - 4  # the user turn but its 4 audio placeholders (hidden states there)
    assert not read[1, 11:17].any()  # the earlier assistant turn


def test_overfit_one_batch():
    """Adam on the talker (code predictor included), thinker states fixed: both CEs fall by 10x."""
    config, _, params = _model()
    tc = config.talker_config
    ids, mask, pos, embeds, hidden = _thinker_batch()
    rng = np.random.default_rng(5)
    frames = np.array([6, 4, 0])
    codes = rng.integers(0, tc.code_predictor_config.vocab_size, (3, MAX_FRAMES, tc.num_code_groups)).astype(np.int32)
    codec_mask = (np.arange(MAX_FRAMES)[None] < frames[:, None]).astype(np.int32)
    batch = dict(input_ids=ids, attention_mask=mask, position_ids=pos, codec_ids=codes, codec_mask=codec_mask,
                 speaker=np.full((3,), sl.default_speaker_id(config), np.int32))
    opt = optax.adam(1e-2)
    update = jax.jit(lambda g, state, p: opt.update(g, state, p))
    apply = jax.jit(optax.apply_updates)
    current = dict(params)
    state = opt.init(params["talker"])
    history = []
    for _ in range(150):
        (_, (talker_ce, cp_ce, _, _)), (grads, _, _) = _grad_fn()(current, embeds, hidden, batch)
        history.append((float(talker_ce), float(cp_ce)))
        updates, state = update(grads["talker"], state, current["talker"])
        current = dict(current, talker=apply(current["talker"], updates))
    (t0, c0), (t1, c1) = history[0], history[-1]
    assert t1 < t0 / 10 and c1 < c0 / 10, history[:: 30] + history[-1:]


def test_trailing_text_past_its_end_is_tts_pad():
    """Bucketed trailing text (inference): entries past the reference's length are tts_pad, also for a row
    whose EOS is the sequence's last token (the reference would otherwise see tts_eos twice)."""
    config, _, _ = _model()
    prompt, answer = _rows()[0]
    ids = np.array([prompt])
    sequence = np.array([prompt + answer[: answer.index(config.im_end_token_id) + 1]])
    exact = talker.plan_talker_inputs(ids, None, sequence, config)
    bucketed = talker.plan_talker_inputs(ids, None, sequence, config, trailing_length=16)
    n = exact.trailing_kind.shape[1]
    np.testing.assert_array_equal(bucketed.trailing_kind[:, :n], exact.trailing_kind)
    assert (bucketed.trailing_kind[:, n:] == talker.TTS_PAD).all()
    assert (exact.trailing_kind == talker.TTS_EOS).sum() == 1


def test_check_speech_targets_errors():
    config, _, _ = _model()
    batch = _training_batch([_speak(0, True, seed=1), _speak(1, True, seed=2)])
    sl.check_speech_targets(batch, config)
    holes = dict(batch, codec_mask=batch["codec_mask"].copy())
    holes["codec_mask"][0, 0] = 0
    with pytest.raises(ValueError, match="real frames first"):
        sl.check_speech_targets(holes, config)
    big = dict(batch, codec_ids=batch["codec_ids"].copy())
    big["codec_ids"][0, 0, 1] = config.talker_config.code_predictor_config.vocab_size
    with pytest.raises(ValueError, match="residual codebook ids"):
        sl.check_speech_targets(big, config)
    with pytest.raises(ValueError, match="codec_ids must be"):
        sl.check_speech_targets(dict(batch, codec_ids=batch["codec_ids"][..., :2]), config)
    with pytest.raises(ValueError, match="speaker must be"):
        sl.check_speech_targets(dict(batch, speaker=np.array([0, 0, 0])), config)
    no_reply = dict(batch, codec_mask=np.ones_like(batch["codec_mask"]))
    no_reply["input_ids"] = batch["input_ids"].copy()
    no_reply["input_ids"][2] = np.where(no_reply["input_ids"][2] == config.assistant_token_id, NEWLINE,
                                        no_reply["input_ids"][2])
    with pytest.raises(ValueError, match=r"rows \[2\] have speech targets"):
        sl.check_speech_targets(no_reply, config)
    assert sl.default_speaker_id(config) == talker.speaker_token_id(config.talker_config, "ethan")
