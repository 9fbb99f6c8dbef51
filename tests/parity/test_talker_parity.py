"""Talker vs the PyTorch reference on tiny random configs (fp32).

Pitfall P11: the talker prompt (user turns through text_projection / hidden_projection, the 9-position
assistant prefix, trailing text with tts_eos after each row's thinker EOS) is compared tensor by tensor
with what the reference's `generate` hands to `talker.generate`, for a left-padded batch with a system
turn, an earlier assistant turn, audio and image placeholders and rows whose thinker stops at different
steps; then the greedy speech codes (talker + code predictor, all 16/4 groups, per-row codec EOS) are
compared id for id with the codes the reference passes to Code2Wav.
"""

from __future__ import annotations

import copy
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.reference import talker_penalty_over_all_generated_tokens
from omni_jax import talker
from omni_jax.generate import SamplingConfig
from tests.conftest import FP32
from tests.parity.test_code_predictor_parity import TALKER_SHAPES, talker_reference

# max |difference| <= 1e-5 x max |reference| (measured: ~2e-7).
TOLERANCE = 1e-5
NEWLINE = 198  # any ordinary token id of the tiny vocabularies
THINKER_NEW_TOKENS = 10
TALKER_NEW_TOKENS = 16


def _close(got, expected, what=""):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    scale = np.abs(expected).max()
    err = np.abs(got - expected).max()
    assert err <= TOLERANCE * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def _distinct_thw_positions(mask):
    text = np.where(mask == 0, 0, np.cumsum(mask, -1) - 1)
    return np.stack([text, 2 * text + 3, (3 * text) % 17 + text // 2]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _forward_fn(name):
    tc = talker_reference(name)[0].talker_config
    return jax.jit(lambda p, x, m, pos: talker.forward(p, x, m, pos, tc, FP32))


@pytest.mark.parametrize("name", sorted(TALKER_SHAPES))
def test_forward_logits_match(name, rng):
    config, ref, params = talker_reference(name)
    tc = config.talker_config
    x = rng.normal(size=(3, 14, tc.text_config.hidden_size)).astype(np.float32)
    mask = np.ones((3, 14), np.int64)
    mask[1, :3] = 0
    mask[2, :9] = 0
    valid = mask.astype(bool)
    # Default positions (the reference computes them from the mask) and M-RoPE rows with T != H != W.
    for positions in (None, _distinct_thw_positions(mask)):
        ref.talker.rope_deltas = None
        with torch.no_grad():
            expected = ref.talker(
                inputs_embeds=torch.tensor(x), attention_mask=torch.tensor(mask),
                position_ids=None if positions is None else torch.tensor(positions).long(),
            ).logits.numpy()
        ours_pos = talker.text_position_ids(mask) if positions is None else positions
        got = _forward_fn(name)(params, x, mask, ours_pos).logits
        _close(np.asarray(got)[valid], expected[valid], f"positions={'text' if positions is None else 'thw'}")


def test_prefill_then_decode_equals_full_forward(rng):
    """The cached path: prefill S-2 positions, decode 2 single steps; logits as the full forward."""
    config, ref, params = talker_reference("tiny")
    tc = config.talker_config
    x = rng.normal(size=(2, 12, tc.text_config.hidden_size)).astype(np.float32)
    mask = np.ones((2, 12), np.int64)
    mask[1, :4] = 0
    pos = _distinct_thw_positions(mask)
    with torch.no_grad():
        expected = ref.talker(inputs_embeds=torch.tensor(x), attention_mask=torch.tensor(mask),
                              position_ids=torch.tensor(pos).long()).logits.numpy()
    prefill = jax.jit(lambda p, x, m, q: talker.prefill(p, x, m, q, tc, FP32, 12))
    decode = jax.jit(lambda p, x, q, c, i, v: talker.decode_step(p, x, q, c, i, v, tc, FP32))
    logits, _, cache = prefill(params, x[:, :10], mask[:, :10], pos[:, :, :10])
    _close(logits, expected[:, 9], "prefill")
    key_valid = np.concatenate([mask[:, :10], np.zeros((2, 2), np.int64)], 1).astype(bool)
    for slot in (10, 11):
        key_valid[:, slot] = True
        logits, _, cache = decode(params, x[:, slot], pos[:, :, slot], cache, slot, key_valid)
        _close(logits, expected[:, slot], f"decode slot {slot}")


def test_frame_step_equals_reference_prepare_inputs(rng):
    """One decode step's input: codes c1..c_{G-1} and E(c0) + sum of residual embeddings + trailing text,
    against the reference's `prepare_inputs_for_generation` (which runs the code predictor)."""
    config, ref, params = talker_reference("g16")
    tc = config.talker_config
    d = tc.text_config.hidden_size
    batch = 3
    hidden = rng.normal(size=(batch, d)).astype(np.float32)
    c0 = rng.integers(0, tc.code_predictor_config.vocab_size, batch)
    trailing = rng.normal(size=(batch, 2, d)).astype(np.float32)
    tts_pad = rng.normal(size=(1, 1, d)).astype(np.float32)
    ref.talker.code_predictor.generation_config.do_sample = False
    frame = jax.jit(lambda p, h, c, t: talker.frame_step(p, h, c, t, jax.random.key(0), tc, FP32,
                                                         cp_sampling=SamplingConfig()))
    for step in (1, 2):  # a trailing-text step and a step past the trailing text (tts_pad)
        with torch.no_grad():
            inputs = ref.talker.prepare_inputs_for_generation(
                torch.tensor(c0)[:, None], past_key_values=None, is_first_iteration=False, use_cache=True,
                hidden_states=((torch.tensor(hidden)[:, None],), None), generation_step=step,
                trailing_text_hidden=torch.tensor(trailing), tts_pad_embed=torch.tensor(tts_pad).expand(batch, -1, -1),
            )
        text = trailing[:, step] if step < 2 else np.broadcast_to(tts_pad[0, 0], (batch, d))
        codes, embed = frame(params, hidden, c0, text)
        np.testing.assert_array_equal(np.asarray(codes), inputs["residual_codes"].numpy())
        _close(embed, inputs["inputs_embeds"][:, 0].numpy(), f"next input embedding, step {step}")


# ------------------------------------------------------------------------------------ whole pipeline
def _prompts(config, rng):
    """Chat prompts: system + user (audio) turn; user, assistant, user (image) turns; one short user turn."""
    c, tc = config, config.thinker_config
    im, end = c.im_start_token_id, c.im_end_token_id

    def turn(role, body):
        return [im, role, NEWLINE] + body + [end, NEWLINE]

    def text(n):
        return [int(t) for t in rng.integers(0, 400, n)]

    reply = [im, c.assistant_token_id, NEWLINE]
    audio = [tc.audio_start_token_id] + [tc.audio_token_id] * 4 + [tc.audio_end_token_id]
    image = [tc.vision_start_token_id, tc.image_token_id, tc.image_token_id, tc.vision_end_token_id]
    return [
        turn(c.system_token_id, text(3)) + turn(c.user_token_id, text(2) + audio + text(3)) + reply,
        turn(c.user_token_id, text(5)) + turn(c.assistant_token_id, text(4)) + turn(c.user_token_id, image + text(2))
        + reply,
        turn(c.user_token_id, text(3)) + reply,
    ]


def _left_pad(rows):
    s = max(map(len, rows))
    ids = np.zeros((len(rows), s), np.int64)
    mask = np.zeros((len(rows), s), np.int64)
    for i, r in enumerate(rows):
        ids[i, s - len(r):] = r
        mask[i, s - len(r):] = 1
    return ids, mask


def _first_positions(generated):
    """{token: [first step in row r, or inf]}."""
    out = {}
    for r, row in enumerate(generated):
        for i, t in enumerate(row.tolist()):
            out.setdefault(t, [np.inf] * len(generated))
            out[t][r] = min(out[t][r], i)
    return out


def _pick_eos(generated):
    """A token that ends some row at step >= 2 while another row runs longer (rows stop at different
    steps), or None. With one row: a token first seen at step >= 2."""
    best = None
    for token, firsts in _first_positions(generated).items():
        finite = [f for f in firsts if np.isfinite(f)]
        if not finite or min(finite) < 2 or min(finite) > generated.shape[1] - 3:
            continue
        if len(firsts) > 1 and len(set(firsts)) == 1:
            continue
        rank = (len(set(firsts)), -min(finite))
        if best is None or rank > best[0]:
            best = (rank, token)
    return None if best is None else best[1]


class _Stop(Exception):
    pass


def _reference_speech(ref, ids, mask, **kwargs):
    """Runs the reference `generate(return_audio=True)`; captures the thinker result, the talker's
    inputs and the codes handed to Code2Wav (which is not run)."""
    captured = {}
    thinker_generate, talker_generate = ref.thinker.generate, ref.talker.generate

    def thinker_spy(*a, **k):
        captured["thinker"] = thinker_generate(*a, **k)
        return captured["thinker"]

    def talker_spy(*a, **k):
        captured["talker_inputs"] = k
        with talker_penalty_over_all_generated_tokens():
            return talker_generate(*a, **k)

    def code2wav_spy(codes, **k):
        captured["codes"] = codes.clone()
        raise _Stop

    ref.thinker.generate, ref.talker.generate, ref.code2wav.chunked_decode = thinker_spy, talker_spy, code2wav_spy
    try:
        with torch.no_grad():
            ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), return_audio=True, **kwargs)
    except _Stop:
        pass
    finally:
        del ref.thinker.generate, ref.talker.generate, ref.code2wav.chunked_decode
    return captured


def _thinker_run(ref, ids, mask):
    """Greedy thinker run with an EOS that never comes, with the hidden states the talker reads."""
    with torch.no_grad():
        return ref.thinker.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=THINKER_NEW_TOKENS,
            do_sample=False, eos_token_id=-1, pad_token_id=0, output_hidden_states=True, return_dict_in_generate=True,
        )


class _Truncated(NamedTuple):
    sequences: torch.Tensor
    hidden_states: tuple


# Every talker run below is padded to one static shape (3 rows, these user / trailing lengths), so that
# the jitted loop compiles once; the single-row scenario runs as 3 copies of its row.
USER_BUCKET = 24
TRAILING_BUCKET = THINKER_NEW_TOKENS + 2
RUN_ROWS = 3


@functools.lru_cache(maxsize=None)
def _scenario(batch: int):
    """(config, params, ids, mask, captured reference run, thinker EOS, codec EOS, suppressed ids).

    EOS ids are chosen among what the greedy models emit so that rows stop at different steps: the
    thinker's from an EOS-free run, the codec's from our own EOS-free talker run on the talker inputs of
    that thinker run (identical to those of the run with the chosen EOS except for entries that become
    tts_pad); then the reference runs with both.
    """
    config, ref, params = talker_reference("tiny")
    tc = config.talker_config
    rows = _prompts(config, np.random.default_rng(1))
    for candidate in ([rows] if batch == 3 else [[r] for r in rows]):
        ids, mask = _left_pad(candidate)
        result = _thinker_run(ref, ids, mask)
        thinker_eos = _pick_eos(result.sequences.numpy()[:, ids.shape[1]:])
        if thinker_eos is not None:
            break
    assert thinker_eos is not None, "no thinker EOS candidate; change the seed"
    # Codebook 0 carries codes below the code predictor's vocabulary; every other id is suppressed. The
    # codec EOS is picked among the codes, so the suppression is the same with and without it.
    suppress = tuple(range(tc.code_predictor_config.vocab_size, tc.text_config.vocab_size))
    # The run with this EOS stops once every row has emitted it: cut the EOS-free run there.
    generated = result.sequences.numpy()[:, ids.shape[1]:]
    hit = generated == thinker_eos
    length = THINKER_NEW_TOKENS if not hit.any(-1).all() else int(hit.argmax(-1).max()) + 1
    result = _Truncated(result.sequences[:, : ids.shape[1] + length], result.hidden_states[:length])
    plan, inputs = _our_inputs(config, params, ids, mask, result, thinker_eos, bucketed=True)
    codec_eos = _pick_eos(_our_codes(config, params, inputs, plan, -1, suppress).tokens[: ids.shape[0]])
    assert codec_eos is not None, "no codec EOS candidate; change the seed"
    captured = _reference_speech(
        ref, ids, mask, speaker="Chelsie", thinker_max_new_tokens=THINKER_NEW_TOKENS, thinker_eos_token_id=thinker_eos,
        thinker_do_sample=False, talker_do_sample=False, talker_max_new_tokens=TALKER_NEW_TOKENS,
        talker_suppress_tokens=list(suppress), talker_eos_token_id=codec_eos,
    )
    return config, params, ids, mask, captured, thinker_eos, codec_eos, suppress


def _our_inputs(config, params, ids, mask, result, thinker_eos, bucketed=False):
    """Our talker inputs from a reference thinker result; `bucketed`: padded to the shared run shape."""
    accept = config.talker_config.accept_hidden_layer
    embed = torch.cat([h[0] for h in result.hidden_states], 1).numpy()
    hidden = torch.cat([h[accept] for h in result.hidden_states], 1).numpy()
    sequences = result.sequences.numpy()
    lengths = {}
    if bucketed:
        lengths = dict(user_length=USER_BUCKET, trailing_length=TRAILING_BUCKET)
        reps = RUN_ROWS // ids.shape[0]
        ids, mask, sequences, embed, hidden = (np.repeat(a, reps, 0) for a in (ids, mask, sequences, embed, hidden))
    plan = talker.plan_talker_inputs(ids, mask, sequences, config, thinker_eos_token_id=thinker_eos, **lengths)
    _, ref, _ = talker_reference("tiny")
    with torch.no_grad():
        tts = ref.thinker.get_input_embeddings()(torch.tensor(talker.tts_token_ids(config))).numpy()
    speaker = np.full(ids.shape[0], talker.speaker_token_id(config.talker_config, "Chelsie"))
    inputs = talker.build_talker_inputs(params, embed, hidden, tts, plan, speaker, config.talker_config, FP32)
    return plan, inputs


@pytest.mark.parametrize("batch", [3, 1])
def test_talker_inputs_equal_the_reference_construction(batch):
    config, params, ids, mask, captured, thinker_eos, _, _ = _scenario(batch)
    expected = captured["talker_inputs"]
    plan, inputs = _our_inputs(config, params, ids, mask, captured["thinker"], thinker_eos)
    np.testing.assert_array_equal(np.asarray(inputs.attention_mask), expected["attention_mask"].numpy())
    valid = expected["attention_mask"].numpy().astype(bool)
    np.testing.assert_array_equal(plan.input_ids[valid], expected["talker_input_ids"].numpy()[valid])
    _close(np.asarray(inputs.embeds)[valid], expected["inputs_embeds"].numpy()[valid], "talker prompt")
    _close(inputs.trailing, expected["trailing_text_hidden"].numpy(), "trailing text")
    _close(inputs.tts_pad, expected["tts_pad_embed"].numpy()[0, 0], "tts_pad")
    if batch == 3:
        # The scenario exercises: multimodal user positions, dropped system/assistant turns, per-row EOS.
        assert plan.user_is_multimodal[0].sum() == 4 and plan.user_is_multimodal[1].sum() == 2
        assert (plan.user_mask.sum(-1) < plan.user_mask.shape[1]).any()
        kinds = plan.trailing_kind
        assert len({int(np.argmax(k == talker.TTS_EOS)) for k in kinds}) > 1, "tts_eos lands at different entries"


def _our_codes(config, params, inputs, plan, codec_eos, suppress):
    return talker.generate_codes(
        params, inputs, talker.text_position_ids(plan.attention_mask), config.talker_config, FP32,
        max_new_tokens=TALKER_NEW_TOKENS, sampling=talker.GREEDY_SAMPLING, suppress_tokens=suppress,
        eos_token_id=codec_eos,
    )


@pytest.mark.parametrize("batch", [3, 1])
def test_greedy_speech_codes_equal_the_reference(batch):
    """Padded to static buckets (and, for one row, batched with copies of itself), the codes equal the
    reference's id for id; the reference runs unpadded, at its own batch size."""
    config, params, ids, mask, captured, thinker_eos, codec_eos, suppress = _scenario(batch)
    plan, inputs = _our_inputs(config, params, ids, mask, captured["thinker"], thinker_eos, bucketed=True)
    out = _our_codes(config, params, inputs, plan, codec_eos, suppress)
    expected = captured["codes"].numpy()
    groups = config.talker_config.num_code_groups
    assert expected.shape[:2] == (batch, groups)
    frames = expected.shape[2]
    assert out.codes.shape == (RUN_ROWS, groups, frames)
    for row in range(RUN_ROWS):
        np.testing.assert_array_equal(out.codes[row], expected[row % batch], err_msg=f"row {row}")
    if batch == 3:
        assert len(set(out.lengths.tolist())) > 1, "rows end at different frames"
        assert out.lengths.min() >= 2


def test_streaming_in_chunks_equals_one_run():
    """`start` + `advance` in chunks (one compilation; a traced stop step) gives the one-run codes."""
    config, params, ids, mask, captured, thinker_eos, codec_eos, suppress = _scenario(3)
    plan, inputs = _our_inputs(config, params, ids, mask, captured["thinker"], thinker_eos, bucketed=True)
    expected = _our_codes(config, params, inputs, plan, codec_eos, suppress)
    tc = config.talker_config
    kwargs = dict(cfg=tc, rt=FP32, sampling=talker.GREEDY_SAMPLING)
    suppress_v, eos = talker.suppress_mask(tc.text_config.vocab_size, suppress), jnp.int32(codec_eos)
    state = talker.start(params, inputs.embeds, inputs.attention_mask,
                         jnp.asarray(talker.text_position_ids(plan.attention_mask)), jax.random.key(0), suppress_v, eos,
                         max_new_tokens=TALKER_NEW_TOKENS, **kwargs)
    streamed = []
    done_frames = 0
    for until in (3, 7, TALKER_NEW_TOKENS):
        state = talker.advance(params, state, inputs.trailing, inputs.tts_pad, suppress_v, eos, jnp.int32(until),
                               cp_sampling=SamplingConfig(), **kwargs)
        step = int(state.step)
        assert step == min(until, expected.codes.shape[2])
        streamed.append(np.asarray(state.codes)[:, done_frames:step])
        done_frames = step
    np.testing.assert_array_equal(talker.collect_codes(state, codec_eos).codes, expected.codes)
    valid = np.arange(done_frames)[None, :] < expected.lengths[:, None]
    np.testing.assert_array_equal(np.concatenate(streamed, 1)[valid], expected.codes.transpose(0, 2, 1)[valid])


def test_speaker_lookup_and_default_suppression():
    config, ref, _ = talker_reference("tiny")
    tc = config.talker_config
    assert talker.speaker_token_id(tc, "ETHAN") == ref.config.talker_config.speaker_id["ethan"]
    with pytest.raises(ValueError, match="valid speakers: aiden, chelsie, ethan"):
        talker.speaker_token_id(tc, "Bob")
    # The reference's list, for the real vocabulary: [2048, 3072) without the codec EOS 2150.
    from omni_jax.config import preset

    real = preset("qwen3-omni-30b-a3b-instruct").talker_config
    suppressed = talker.default_suppress_tokens(real)
    assert suppressed == tuple(i for i in range(2048, 3072) if i != 2150)
    assert talker.default_suppress_tokens(tc) == tuple(i for i in range(32, 1056) if i != tc.codec_eos_token_id)


def test_bfloat16_logits_close_by_kl(rng):
    """bf16 talker vs the fp32 reference: KL no worse than the reference's own bf16 run (plus slack)."""
    config, ref, params = talker_reference("tiny")
    tc = config.talker_config
    x = rng.normal(size=(2, 20, tc.text_config.hidden_size)).astype(np.float32)
    mask = np.ones((2, 20), np.int64)
    mask[1, :6] = 0
    valid = mask.astype(bool)
    bf16 = FP32.replace(dtype="bfloat16", param_dtype="bfloat16")
    params_bf16 = jax.tree.map(lambda a: a.astype("bfloat16"), params)
    ours = jax.jit(lambda p, x, m, q: talker.forward(p, x, m, q, tc, bf16).logits)(
        params_bf16, x, mask, talker.text_position_ids(mask))
    ours = np.asarray(ours.astype(jnp.float32))[valid]
    with torch.no_grad():
        ref.talker.rope_deltas = None
        exact = ref.talker(inputs_embeds=torch.tensor(x), attention_mask=torch.tensor(mask)).logits[valid]
        # A copy: casting the shared reference to bf16 and back would round its weights for later tests.
        talker_bf16 = copy.deepcopy(ref.talker).to(torch.bfloat16)
        talker_bf16.rope_deltas = None
        ref_bf16 = talker_bf16(inputs_embeds=torch.tensor(x).bfloat16(),
                               attention_mask=torch.tensor(mask)).logits.float()[valid]

    def kl(p_logits, q_logits):
        p = torch.log_softmax(torch.as_tensor(p_logits, dtype=torch.float64), -1)
        q = torch.log_softmax(torch.as_tensor(q_logits, dtype=torch.float64), -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    ours_kl, reference_kl = kl(exact, ours), kl(exact, ref_bf16)
    assert ours_kl < 1e-3, ours_kl
    assert ours_kl <= 3 * reference_kl + 1e-5, (ours_kl, reference_kl)
