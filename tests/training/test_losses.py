"""Thinker training losses vs the PyTorch reference (fp32, tiny preset).

* `load_balancing_loss` equals transformers' `load_balancing_loss_func` (with and without a padding
  mask), and its sums split over parts of a batch add up to the whole batch's loss (global batch).
* `cross_entropy_sums` equals the reference's `ForCausalLMLoss` (labels shifted by the data pipeline).
* The train step's loss on a right-padded batch with audio and an image (encoders, TM-RoPE, DeepStack)
  equals `Qwen3OmniMoeThinkerForConditionalGeneration(labels=..., output_router_logits=True).loss`
  (cross-entropy + coef * aux loss; the reference computes its own position ids), and gradients of
  decoder, router, expert, lm_head, embedding, audio-tower and vision-encoder parameters equal torch
  autograd's on the same loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func

from omni_jax.audio_encoder import audio_output_lengths
from omni_jax.positions import position_ids_for_inputs
from omni_jax.training import losses
from omni_jax.training.config import TrainConfig
from omni_jax.training.step import TrainState, make_train_step
from tests.conftest import reference_and_params

# fp32 bars: losses within 1e-5 relative (measured ~1e-7); gradients within 1e-5 x the parameter's
# largest reference gradient (measured 3e-7 (lm_head) to 2.7e-6 (audio conv2d1)).
LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-5
AUX_COEF = 0.5  # large enough that the load-balancing gradient is visible next to the cross-entropy's


# ------------------------------------------------------------------------------------ unit parity
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_matches_reference_function(masked):
    rng = np.random.default_rng(0)
    layers, batch, seq, experts, top_k = 3, 2, 7, 8, 2
    logits = rng.standard_normal((layers, batch * seq, experts)).astype(np.float32)
    mask = np.ones((batch, seq), np.int64)
    if masked:
        mask[0, 5:] = 0
        mask[1, 2:] = 0
    expected = load_balancing_loss_func(
        tuple(torch.tensor(x) for x in logits), experts, top_k, torch.tensor(mask) if masked else None
    ).item()
    got = float(losses.load_balancing_loss(jnp.asarray(logits), jnp.asarray(mask) if masked else None, top_k))
    assert abs(got - expected) <= 1e-6 * abs(expected), (got, expected)


def test_router_stats_of_parts_add_up_to_the_global_batch():
    """Sums over two halves of a batch, combined, give the whole batch's loss (what the accumulated and
    the sharded step rely on); the mean of the halves' own losses does not."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((2, 4 * 5, 8)).astype(np.float32) * 2)
    mask = jnp.asarray((rng.random((4, 5)) > 0.3).astype(np.int32))
    whole = losses.load_balancing_loss(logits, mask, 2)
    a = losses.router_stats(logits[:, :10], mask[:2].reshape(-1), 2)
    b = losses.router_stats(logits[:, 10:], mask[2:].reshape(-1), 2)
    counts, rows = a.counts + b.counts, a.rows + b.rows
    combined = losses.load_balancing_from_stats(a, counts, rows) + losses.load_balancing_from_stats(b, counts, rows)
    np.testing.assert_allclose(float(combined), float(whole), rtol=1e-6)
    halves = (losses.load_balancing_from_stats(a) + losses.load_balancing_from_stats(b)) / 2
    assert abs(float(halves) - float(whole)) > 1e-4


def test_cross_entropy_matches_reference():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((2, 6, 11)).astype(np.float32) * 3
    hf_labels = rng.integers(0, 11, (2, 6))
    hf_labels[0, :2] = -100
    hf_labels[1, 4:] = -100
    expected = ForCausalLMLoss(torch.tensor(logits), torch.tensor(hf_labels), vocab_size=11).item()
    shifted = np.concatenate([hf_labels[:, 1:], np.full((2, 1), -100)], axis=1)  # the data pipeline's labels
    got = float(losses.next_token_loss(jnp.asarray(logits), jnp.asarray(shifted)))
    assert abs(got - expected) <= 1e-6 * abs(expected)
    total, count = losses.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(shifted))
    assert float(count) == np.sum(shifted != -100)


# ------------------------------------------------------------------------------ whole-model parity
def _media_batch(config):
    """Two right-padded rows: [text, audio (230 frames), text, image (1, 4, 6), answer] and
    [text, audio (130 frames), answer]; labels on the answers (the data pipeline's shifted form)."""
    c = config.thinker_config
    rng = np.random.default_rng(3)
    frames = [230, 130]
    tokens = [int(n) for n in audio_output_lengths(np.array(frames))]
    grid = (1, 4, 6)
    text = lambda n: rng.integers(0, 400, n).tolist()  # noqa: E731
    audio = lambda n: [c.audio_start_token_id] + [c.audio_token_id] * n + [c.audio_end_token_id]  # noqa: E731
    image = [c.vision_start_token_id] + [c.image_token_id] * (int(np.prod(grid)) // 4) + [c.vision_end_token_id]
    rows = [text(3) + audio(tokens[0]) + text(2) + image + text(2), text(4) + audio(tokens[1]) + text(1)]
    answers = [text(6), text(9)]
    seq = max(len(r) + len(a) for r, a in zip(rows, answers))
    ids = np.zeros((2, seq), np.int64)
    mask = np.zeros((2, seq), np.int64)
    hf_labels = np.full((2, seq), -100, np.int64)
    for i, (r, a) in enumerate(zip(rows, answers)):
        ids[i, : len(r) + len(a)] = r + a
        mask[i, : len(r) + len(a)] = 1
        hf_labels[i, len(r): len(r) + len(a)] = a
    feats = np.zeros((2, 128, max(frames)), np.float32)
    fam = np.zeros((2, max(frames)), np.int64)
    for i, f in enumerate(frames):
        feats[i, :, :f] = rng.standard_normal((128, f))
        fam[i, :f] = 1
    media = dict(input_features=feats, feature_attention_mask=fam,
                 pixel_values=rng.standard_normal((int(np.prod(grid)), 3 * 2 * 16 * 16)).astype(np.float32),
                 image_grid_thw=np.array([grid], np.int64))
    labels = np.concatenate([hf_labels[:, 1:], np.full((2, 1), -100)], axis=1)
    return ids, mask, hf_labels, labels, media


@functools.lru_cache(maxsize=None)
def _ours():
    config, _, params = reference_and_params("tiny")
    ids, mask, _, labels, media = _media_batch(config)
    cfg = TrainConfig.load(None, ["runtime.dtype=float32", "runtime.param_dtype=float32", "stage=thinker",
                                  f"loss.aux_loss_coef={AUX_COEF}"])
    step = make_train_step(config, cfg)
    state = step.init_state(params)
    pos = position_ids_for_inputs(ids, mask, config.thinker_config, **media)[0]
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, position_ids=pos, **media)
    metrics, grads = step.loss_and_grads(state, batch)
    return jax.device_get(metrics), jax.device_get(grads)


@functools.lru_cache(maxsize=None)
def _reference():
    config, ref, _ = reference_and_params("tiny")
    ids, mask, hf_labels, _, media = _media_batch(config)
    thinker = ref.thinker
    saved = thinker.router_aux_loss_coef
    thinker.router_aux_loss_coef = AUX_COEF
    try:
        thinker.zero_grad(set_to_none=True)
        with torch.enable_grad():
            out = thinker(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(hf_labels),
                          output_router_logits=True, **{k: torch.tensor(v) for k, v in media.items()})
            out.loss.backward()
        grads = {n: p.grad.detach().numpy().copy() for n, p in thinker.named_parameters() if p.grad is not None}
        thinker.zero_grad(set_to_none=True)
    finally:
        thinker.router_aux_loss_coef = saved
    return out.loss.item(), out.aux_loss.item(), grads


def test_loss_matches_reference_thinker():
    metrics, _ = _ours()
    loss, aux, _ = _reference()
    assert abs(metrics["aux_loss"] - aux) <= LOSS_TOLERANCE * abs(aux), (metrics["aux_loss"], aux)
    assert abs(metrics["loss"] - loss) <= LOSS_TOLERANCE * abs(loss), (metrics["loss"], loss)
    assert abs(metrics["ce_loss"] + AUX_COEF * metrics["aux_loss"] - metrics["loss"]) <= 1e-6 * loss


# (our path, reference name, how the reference tensor maps to ours)
_T = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731  nn.Linear weight -> kernel
_GRADS = [
    ("lm_head/kernel", "lm_head.weight", _T),
    ("model/embed_tokens/weight", "model.language_model.embed_tokens.weight", None),
    ("model/layers/self_attn/q_proj/kernel", "model.language_model.layers.{i}.self_attn.q_proj.weight", _T),
    ("model/layers/self_attn/k_norm/weight", "model.language_model.layers.{i}.self_attn.k_norm.weight", None),
    ("model/layers/mlp/gate/kernel", "model.language_model.layers.{i}.mlp.gate.weight", _T),
    ("model/layers/mlp/experts/down_proj", "model.language_model.layers.{i}.mlp.experts.down_proj",
     lambda x: np.swapaxes(x, -1, -2)),
    ("model/norm/weight", "model.language_model.norm.weight", None),
    ("audio_tower/conv2d1/weight", "model.audio_tower.conv2d1.weight", None),
    ("audio_tower/layers/self_attn/k_proj/kernel", "model.audio_tower.layers.{i}.self_attn.k_proj.weight", _T),
    ("audio_tower/proj2/bias", "model.audio_tower.proj2.bias", None),
    ("visual/patch_embed/proj/weight", "model.visual.patch_embed.proj.weight", None),
    ("visual/pos_embed/weight", "model.visual.pos_embed.weight", None),
    ("visual/blocks/attn/qkv/kernel", "model.visual.blocks.{i}.attn.qkv.weight", _T),
    ("visual/merger_list/1/mlp/0/kernel", "model.visual.merger_list.1.mlp.0.weight", _T),
    ("visual/merger/mlp/2/kernel", "model.visual.merger.mlp.2.weight", _T),
]


@pytest.mark.parametrize("path,ref_name,transform", _GRADS, ids=[g[0] for g in _GRADS])
def test_gradients_match_torch_autograd(path, ref_name, transform):
    _, grads = _ours()
    _, _, ref_grads = _reference()
    node = grads["thinker"]
    for part in path.split("/"):
        node = node[part]
    got = np.asarray(node)
    if "{i}" in ref_name:
        expected = np.stack([ref_grads[ref_name.format(i=i)] for i in range(got.shape[0])])
    else:
        expected = ref_grads[ref_name]
    if transform is not None:
        expected = transform(expected)
    assert got.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 0, "the reference gradient is zero: the test would prove nothing"
    err = np.abs(got - expected).max() / scale
    assert err <= GRAD_TOLERANCE, f"{path}: max |diff| / max |grad| = {err:.2e}"
