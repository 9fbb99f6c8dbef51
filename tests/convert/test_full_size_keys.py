"""Converter completeness at full size, without the weights (issue 4, item 6).

The transformers reference for the real Qwen3-Omni-30B-A3B configs is built on PyTorch's meta
device (`tools/list_checkpoint_keys.py`: parameters have shapes and no storage; the non-persistent
buffers are computed for real). Its state-dict keys, in the transformers-5 in-memory layout and in
the published hub layout, are accounted against the converter's layout maps over the full-size
omni_jax ParamSpec tree: every key fills exactly one parameter slot with the right shape, no slot
stays unfilled, and the element counts agree. Nothing of the model's size is allocated.

The published Qwen3-Omni-30B-A3B-Instruct checkpoint (15 safetensors files) holds 28,010 tensors
and 35,259,818,545 elements, in the hub layout; the listing derived here must be that.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import hf_to_jax
from convert.hf_to_jax import CheckpointError
from convert.layout import fused_layout, hub_layout, normalize_key
from omni_jax import code2wav
from omni_jax.audio_encoder import sinusoid_positions
from omni_jax.config import preset
from omni_jax.model import model_specs
from omni_jax.nn.params import flatten, init_params
from omni_jax.nn.rope import inverse_frequencies
from tests.conftest import thinker_only
from tools import list_checkpoint_keys
from tools.list_checkpoint_keys import account, buffers, hub_keys, memory_keys, reference_on_meta, transformers_hub_keys

INSTRUCT = "qwen3-omni-30b-a3b-instruct"
THINKING = "qwen3-omni-30b-a3b-thinking"
CAPTIONER = "qwen3-omni-30b-a3b-captioner"
PUBLISHED_INSTRUCT_TENSORS = 28_010
PUBLISHED_INSTRUCT_ELEMENTS = 35_259_818_545


@functools.lru_cache(maxsize=None)
def _reference(name: str):
    return reference_on_meta(preset(name))


@functools.lru_cache(maxsize=None)
def _specs(name: str) -> dict:
    return model_specs(preset(name))


@functools.lru_cache(maxsize=None)
def _keys(name: str, layout: str) -> dict[str, tuple[int, ...]]:
    memory = memory_keys(_reference(name))
    return memory if layout == "memory" else hub_keys(memory)


def _elements(keys: dict) -> int:
    return sum(math.prod(s) for s in keys.values())


def _reference_elements(name: str) -> int:
    return sum(p.numel() for p in _reference(name).parameters())


def _assert_complete(acc, what: str):
    assert not acc.unmapped, f"{what}: {len(acc.unmapped)} keys match no parameter: {acc.unmapped[:10]}"
    assert not acc.misshaped, f"{what}: {len(acc.misshaped)} keys have the wrong shape: {acc.misshaped[:10]}"
    assert not acc.duplicates, f"{what}: {len(acc.duplicates)} keys fill a filled slot: {acc.duplicates[:10]}"
    assert not acc.unfilled, f"{what}: parameters left (partly) unfilled: {dict(list(acc.unfilled.items())[:10])}"


def test_reference_is_the_whole_model_on_meta():
    model = _reference(INSTRUCT)
    assert model.has_talker
    for part in ("thinker.model.audio_tower", "thinker.model.visual", "thinker.model.language_model",
                 "thinker.lm_head", "talker.model", "talker.code_predictor", "code2wav.pre_transformer",
                 "code2wav.upsample", "code2wav.decoder"):
        assert model.get_submodule(part) is not None
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert _reference_elements(INSTRUCT) == PUBLISHED_INSTRUCT_ELEMENTS

    for name in (THINKING, CAPTIONER):
        model = _reference(name)
        assert not model.has_talker and not hasattr(model, "talker") and not hasattr(model, "code2wav")
        assert set(_specs(name)) == {"thinker"}
        assert memory_keys(model) == _keys(THINKING, "memory")
    thinking = flatten(_specs(THINKING))  # the Captioner's parameters are the Thinking model's
    assert {p: s.shape for p, s in flatten(_specs(CAPTIONER)).items()} == {p: s.shape for p, s in thinking.items()}


def test_hub_listing_is_the_published_layout():
    """Renaming + splitting the in-memory keys gives exactly what transformers' save writes."""
    hub = _keys(INSTRUCT, "hub")
    assert hub == transformers_hub_keys(_reference(INSTRUCT))
    assert len(hub) == PUBLISHED_INSTRUCT_TENSORS
    assert _elements(hub) == PUBLISHED_INSTRUCT_ELEMENTS
    assert not [k for k in hub if "language_model" in k or "gate_up_proj" in k or k.startswith("thinker.model.audio")]
    for key, shape in {
        "thinker.model.embed_tokens.weight": (152064, 2048),
        "thinker.lm_head.weight": (152064, 2048),
        "thinker.model.layers.47.mlp.experts.127.gate_proj.weight": (768, 2048),
        "thinker.model.layers.47.mlp.experts.127.down_proj.weight": (2048, 768),
        "thinker.model.layers.0.mlp.gate.weight": (128, 2048),
        "thinker.audio_tower.conv2d1.weight": (480, 1, 3, 3),
        "thinker.audio_tower.conv_out.weight": (1280, 7680),
        "thinker.visual.blocks.26.attn.qkv.weight": (3456, 1152),
        "thinker.visual.patch_embed.proj.weight": (1152, 3, 2, 16, 16),
        "thinker.visual.merger_list.2.mlp.2.weight": (2048, 4608),
        "talker.model.codec_embedding.weight": (3072, 1024),
        "talker.codec_head.weight": (3072, 1024),
        "talker.model.layers.19.mlp.experts.127.up_proj.weight": (384, 1024),
        "talker.model.layers.19.mlp.shared_expert_gate.weight": (1, 1024),
        "talker.code_predictor.model.codec_embedding.14.weight": (2048, 1024),
        "talker.code_predictor.lm_head.14.weight": (2048, 1024),
        "code2wav.code_embedding.weight": (32768, 1024),
        "code2wav.pre_transformer.layers.7.mlp_layer_scale.scale": (1024,),
        "code2wav.upsample.1.1.dwconv.conv.weight": (1024, 1, 7),
        "code2wav.decoder.1.block.1.conv.weight": (1536, 768, 16),
        "code2wav.decoder.6.conv.weight": (1, 96, 7),
    }.items():
        assert hub[key] == shape, key


@pytest.mark.parametrize("layout", ["hub", "memory"])
@pytest.mark.parametrize("name", [INSTRUCT, THINKING])
def test_every_key_fills_exactly_one_slot(name, layout):
    keys = _keys(name, layout)
    specs = _specs(name)
    acc = account(keys, specs)
    _assert_complete(acc, f"{name} ({layout} layout)")
    assert not acc.absent
    # one slot per hub-layout key; the fused in-memory keys cover all experts of a layer each
    assert len(acc.filled) == len(hub_layout(specs))
    assert acc.checkpoint_elements == acc.model_elements == _elements(keys) == _reference_elements(name)
    if layout == "memory":
        fused = [k for k in keys if re.search(r"\.experts\.(gate_up_proj|down_proj)$", k)]
        assert len(fused) == len(fused_layout(specs)) == 2 * (48 + (20 if name == INSTRUCT else 0))


def test_full_size_specs_build_abstractly():
    """`jax.eval_shape` of the real initialiser: the parameter tree the converter fills, shape for shape."""
    specs = flatten(_specs(INSTRUCT))
    init = functools.partial(init_params, _specs(INSTRUCT), dtype=jnp.bfloat16)
    out = flatten(jax.eval_shape(init, jax.random.key(0)))
    assert set(out) == set(specs)
    assert all(tuple(out[p].shape) == tuple(s.shape) for p, s in specs.items())
    assert sum(math.prod(s.shape) for s in out.values()) == PUBLISHED_INSTRUCT_ELEMENTS


@pytest.mark.parametrize("layout", ["hub", "memory"])
def test_instruct_checkpoint_into_thinker_only_config(layout):
    """The Instruct checkpoint's talker and Code2Wav are reported as left-out components; the rest fills
    the thinker-only model completely."""
    keys = _keys(INSTRUCT, layout)
    acc = account(keys, _specs(THINKING))
    _assert_complete(acc, f"Instruct ({layout}) into Thinking")
    assert set(acc.absent) == {"talker", "code2wav"}
    for component in ("talker", "code2wav"):
        assert sorted(acc.absent[component]) == sorted(k for k in keys if k.startswith(component + "."))
    assert acc.checkpoint_elements == acc.model_elements == _reference_elements(THINKING)


def test_convert_tensors_reports_left_out_components_at_full_size():
    """`convert_tensors` itself on the full-size Thinking specs, fed Instruct talker/Code2Wav keys: they
    match no parameter, so no tensor is read and nothing is allocated (all 8,267 of them).
    """
    hub = _keys(INSTRUCT, "hub")
    left_out = {k: s for k, s in hub.items() if k.startswith(("talker.", "code2wav."))}
    n_talker = sum(k.startswith("talker.") for k in left_out)
    assert n_talker > 50 and len(left_out) - n_talker > 50

    def never(key):
        def load():
            raise AssertionError(f"{key} was read")
        return load

    triples = [(k, never(k), s) for k, s in left_out.items()]
    specs = _specs(THINKING)
    with pytest.raises(CheckpointError) as err:
        hf_to_jax.convert_tensors(triples, specs)
    message = str(err.value)
    assert f"talker: {n_talker} keys" in message
    assert f"code2wav: {len(left_out) - n_talker} keys" in message
    assert f"{len(hub_layout(specs))} model parameters are missing" in message  # no thinker key was given
    with pytest.raises(CheckpointError) as err:
        hf_to_jax.convert_tensors(triples, specs, skip_absent_components=True)
    assert "talker" not in str(err.value) and "missing from the checkpoint" in str(err.value)


def test_convert_tensors_loads_the_rest_of_an_instruct_checkpoint_into_a_thinker_only_config():
    """The same end to end on the tiny config, with real tensors."""
    from convert.reference import reference_model, state_dict_tensors

    config = preset("tiny")
    ref = reference_model(config)
    specs = model_specs(thinker_only(config))
    with pytest.raises(CheckpointError, match=r"(?s)talker: \d+ keys.*code2wav: \d+ keys"):
        hf_to_jax.convert_tensors(state_dict_tensors(ref), specs, dtype="float32")
    out = hf_to_jax.convert_tensors(state_dict_tensors(ref), specs, dtype="float32", skip_absent_components=True)
    assert set(out) == set(flatten(specs))
    embed = ref.thinker.model.language_model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(out["thinker/model/embed_tokens/weight"], embed)


# Every buffer of the reference; all non-persistent (recomputed at load, never in a checkpoint).
BUFFERS = {
    "thinker.model.audio_tower.positional_embedding.positional_embedding",
    "thinker.model.visual.rotary_pos_emb.inv_freq",
    "thinker.model.visual.rotary_pos_emb.original_inv_freq",
    "thinker.model.language_model.rotary_emb.inv_freq",
    "thinker.model.language_model.rotary_emb.original_inv_freq",
    "talker.model.rotary_emb.inv_freq",
    "talker.model.rotary_emb.original_inv_freq",
    "talker.code_predictor.model.rotary_emb.inv_freq",
    "talker.code_predictor.model.rotary_emb.original_inv_freq",
    "code2wav.code_offset",
    "code2wav.pre_transformer.rotary_emb.inv_freq",
    "code2wav.pre_transformer.rotary_emb.original_inv_freq",
}


def test_buffers_are_not_checkpoint_keys_and_omni_jax_recomputes_them():
    model = _reference(INSTRUCT)
    found = buffers(model)
    assert set(found) == BUFFERS
    assert not BUFFERS & set(_keys(INSTRUCT, "memory")) and not BUFFERS & set(_keys(INSTRUCT, "hub"))
    specs = _specs(INSTRUCT)
    slots = set(hub_layout(specs)) | set(fused_layout(specs))
    assert not {normalize_key(b) for b in BUFFERS} & slots  # nothing of the model expects them
    assert {b for b in buffers(_reference(THINKING))} == {b for b in BUFFERS if b.startswith("thinker.")}
    assert all(b.device.type == "cpu" for b in found.values())  # computed for real, not meta

    config = preset(INSTRUCT)
    text, talker, vision = config.text, config.talker_config, config.thinker_config.vision_config
    c2w, audio = config.code2wav_config, config.thinker_config.audio_config
    rotary = {
        "thinker.model.language_model.rotary_emb": inverse_frequencies(text.head_dim, text.rope_theta),
        "talker.model.rotary_emb": inverse_frequencies(talker.text_config.head_dim, talker.text_config.rope_theta),
        "talker.code_predictor.model.rotary_emb": inverse_frequencies(
            talker.code_predictor_config.head_dim, talker.code_predictor_config.rope_theta),
        # omni_jax's vision rope: 1-D tables of head_dim / 2 per spatial axis (vision_encoder.rope_cos_sin)
        "thinker.model.visual.rotary_pos_emb": inverse_frequencies(vision.hidden_size // vision.num_heads // 2,
                                                                   vision.rope_theta),
        "code2wav.pre_transformer.rotary_emb": inverse_frequencies(c2w.hidden_size // c2w.num_attention_heads,
                                                                   c2w.rope_theta),
    }
    for prefix, ours in rotary.items():
        ref = found[f"{prefix}.inv_freq"].numpy()
        np.testing.assert_array_equal(found[f"{prefix}.original_inv_freq"].numpy(), ref)
        # torch's fp32 pow is 1 ulp off the correctly rounded value at one of the 64 entries of the
        # (128, theta 1e6) table (entry 37: at position 65536 that is 2e-6 rad); the others are exact.
        np.testing.assert_array_max_ulp(ours, ref, maxulp=1)

    # The audio sinusoid table, sin | cos of position p times inverse timescales exp(-c k). Ours
    # rounds exp correctly; torch's vectorised fp32 exp is 1 ulp off at some k, which ones depending on
    # the CPU (6 of 640 on an AVX-512 Xeon). So: torch's timescales are within
    # 1 ulp of ours; from torch's timescales our formula gives the table (1 ulp of sin/cos); and ours
    # is the table to 1 ulp where the timescales agree, and elsewhere differs by no more than a 1-ulp
    # timescale makes at p: p ulp(inv) in the product, plus the product's own rounding, ulp(p inv)
    # (measured up to 1.22e-4 at p = 1293 on the Xeon).
    table = found["thinker.model.audio_tower.positional_embedding.positional_embedding"].numpy()
    ours = sinusoid_positions(audio.max_source_positions, audio.d_model)
    assert ours.shape == table.shape == (1500, 1280)
    half = audio.d_model // 2
    exponent = np.float32(-np.log(10000.0) / (half - 1)) * np.arange(half, dtype=np.float32)
    ours_inv = np.exp(exponent.astype(np.float64)).astype(np.float32)
    torch_inv = torch.exp(torch.from_numpy(exponent)).numpy()  # the reference's fp32 exp, on this CPU
    np.testing.assert_array_max_ulp(torch_inv, ours_inv, maxulp=1)
    positions = np.arange(table.shape[0], dtype=np.float32)[:, None]
    torch_scaled = (positions * torch_inv[None, :]).astype(np.float64)
    from_torch_inv = np.concatenate([np.sin(torch_scaled), np.cos(torch_scaled)], axis=1).astype(np.float32)
    np.testing.assert_array_max_ulp(from_torch_inv, table, maxulp=1)
    agree = torch_inv == ours_inv
    np.testing.assert_array_max_ulp(ours[:, np.tile(agree, 2)], table[:, np.tile(agree, 2)], maxulp=1)
    bound = positions * np.spacing(ours_inv)[None, :] + np.spacing(positions * ours_inv[None, :])
    bound = np.concatenate([bound, bound], axis=1) + 2 * np.spacing(np.float32(1.0))
    excess = np.abs(ours - table) - bound
    assert excess.max() <= 0, f"sinusoid table off by more than a 1-ulp timescale explains at {np.argmax(excess)}"
    np.testing.assert_allclose(ours[:2], table[:2], rtol=0, atol=1.2e-7)

    # Code2Wav's code_offset, through omni_jax's embedding lookup: a table whose row r holds r.
    offset = found["code2wav.code_offset"].numpy()  # (1, Q, 1)
    assert offset.shape == (1, c2w.num_quantizers, 1)
    rows = c2w.num_quantizers * c2w.codebook_size
    params = {"code_embedding": {"weight": jnp.arange(rows, dtype=jnp.float32)[:, None]}}
    codes = np.random.default_rng(0).integers(0, c2w.codebook_size, (2, c2w.num_quantizers, 5))
    got = np.asarray(code2wav.embed_codes(params, jnp.asarray(codes), c2w, jnp.float32))[..., 0]
    np.testing.assert_allclose(got, (codes + offset).mean(axis=1), rtol=1e-7)


def test_no_tied_weights_in_the_real_configs():
    """The reference declares lm_head/embedding ties, but the real configs switch them off: both tensors
    are stored, and they fill different parameters."""
    model = _reference(INSTRUCT)
    assert model.all_tied_weights_keys == {}
    assert all(not getattr(m, "all_tied_weights_keys", None) for m in model.modules())
    thinker, talker = model.thinker, model.talker
    assert thinker.lm_head.weight is not thinker.model.language_model.embed_tokens.weight
    assert talker.codec_head.weight is not talker.model.codec_embedding.weight
    acc = account(_keys(INSTRUCT, "hub"), _specs(INSTRUCT))
    owner = {key: path for (path, _), key in acc.filled.items()}
    for a, b in (("thinker.lm_head.weight", "thinker.model.embed_tokens.weight"),
                 ("talker.codec_head.weight", "talker.model.codec_embedding.weight")):
        assert owner[a] != owner[b]


def test_accounting_catches_each_kind_of_mismatch():
    """The accounting is not vacuous: a dropped, extra, doubled or mis-shaped key is each reported."""
    keys = dict(_keys(INSTRUCT, "memory"))
    del keys["talker.model.layers.3.mlp.experts.gate_up_proj"]
    keys["thinker.model.language_model.layers.0.self_attn.extra.weight"] = (4,)
    keys["thinker.model.layers.0.input_layernorm.weight"] = (2048,)  # hub spelling of a key already there
    keys["thinker.model.layers.5.mlp.experts.7.gate_proj.weight"] = (768, 2048)  # one expert of a fused tensor
    keys["code2wav.decoder.6.conv.weight"] = (1, 96, 8)
    acc = account(keys, _specs(INSTRUCT))
    assert acc.unmapped == ["thinker.model.language_model.layers.0.self_attn.extra.weight"]
    assert [d.split(" ")[0] for d in acc.duplicates] == [
        "thinker.model.layers.0.input_layernorm.weight", "thinker.model.layers.5.mlp.experts.7.gate_proj.weight"]
    assert len(acc.misshaped) == 1
    assert acc.misshaped[0].startswith("code2wav.decoder.6.conv.weight: checkpoint (1, 96, 8)")
    assert acc.unfilled == {
        "talker/model/layers/mlp/experts/gate_proj": 128 * 1024 * 384,
        "talker/model/layers/mlp/experts/up_proj": 128 * 1024 * 384,
        "code2wav/decoder/6/conv/weight": 96 * 7,
    }
    assert not acc.complete and not acc.absent


def test_check_tool_on_a_saved_checkpoint(tmp_path, capsys):
    """On disk: what `save_pretrained` writes (tiny config) is the hub listing, and `--check` accounts it."""
    from convert.reference import reference_model

    config = preset("tiny")
    reference_model(config).save_pretrained(tmp_path)
    on_disk = list_checkpoint_keys.checkpoint_keys(str(tmp_path))
    assert on_disk == hub_keys(memory_keys(reference_on_meta(config)))
    assert list_checkpoint_keys.main(["--check", str(tmp_path)]) == 0
    assert "only in the checkpoint 0, only in the reference 0, different shapes 0" in capsys.readouterr().out
