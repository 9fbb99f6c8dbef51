"""Converter: both checkpoint layouts, strict-key errors, components the config leaves out, round trips."""

import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch

import omni_jax
from convert import hf_to_jax, jax_to_hf
from convert.hf_to_jax import CheckpointError
from tests.conftest import FP32, left_padded_batch, reference_and_params


def _logits(model, ids, mask):
    return model.thinker_logits(ids, mask)


@pytest.fixture(scope="module")
def hub_checkpoint(tmp_path_factory):
    """The reference's `save_pretrained` output: hub layout, one tensor per expert."""
    config, ref, _ = reference_and_params("tiny")
    folder = tmp_path_factory.mktemp("hub")
    ref.save_pretrained(folder)
    return config, ref, str(folder)


def _expected_logits(ref, ids, mask):
    with torch.no_grad():
        return ref.thinker(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def test_hub_layout_loads_and_matches_reference(hub_checkpoint, rng):
    config, ref, folder = hub_checkpoint
    keys = set()
    for name in hf_to_jax.list_safetensors(folder):
        with safetensors.safe_open(name, "pt") as f:
            keys.update(f.keys())
    assert "thinker.model.layers.0.mlp.experts.0.gate_proj.weight" in keys  # really the hub layout
    assert any(k.startswith("thinker.audio_tower.") for k in keys) and any(k.startswith("thinker.visual.") for k in keys)
    model = omni_jax.load_pretrained(folder, dtype="float32")  # strict: every key, encoders included
    ids, mask = left_padded_batch(rng, 2, 16, config.text.vocab_size, pads=(0, 3))
    np.testing.assert_allclose(_logits(model, ids, mask)[mask == 1], _expected_logits(ref, ids, mask)[mask == 1],
                               atol=2e-6, rtol=1e-5)


def test_transformers5_fused_layout_loads(tmp_path, hub_checkpoint, rng):
    config, ref, hub = hub_checkpoint
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)  # really the fused in-memory layout
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(open(os.path.join(hub, "config.json")).read())
    fused = omni_jax.load_pretrained(tmp_path, dtype="float32")
    per_expert = omni_jax.load_pretrained(hub, dtype="float32")
    for a, b in zip(np.asarray(fused.params["thinker"]["model"]["layers"]["mlp"]["experts"]["up_proj"]),
                    np.asarray(per_expert.params["thinker"]["model"]["layers"]["mlp"]["experts"]["up_proj"])):
        np.testing.assert_array_equal(a, b)
    ids, mask = left_padded_batch(rng, 2, 12, config.text.vocab_size, pads=(0, 2))
    np.testing.assert_array_equal(_logits(fused, ids, mask), _logits(per_expert, ids, mask))


def _tensors(ref):
    return {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}


def _convert(tensors, config, **kw):
    from omni_jax.model import model_specs

    triples = [(k, (lambda v=v: v), v.shape) for k, v in tensors.items()]
    return hf_to_jax.convert_tensors(triples, model_specs(config), dtype="float32", **kw)


def test_strict_errors_name_the_keys(hub_checkpoint):
    config, ref, _ = hub_checkpoint
    tensors = _tensors(ref)
    _convert(tensors, config)  # every key consumed, audio tower and vision encoder included
    thinker_only = tensors
    without_tower = {k: v for k, v in tensors.items() if "audio_tower" not in k}
    with pytest.raises(CheckpointError, match=r"missing .*\n.*thinker\.audio_tower\."):
        _convert(without_tower, config)

    broken = dict(thinker_only)
    del broken["thinker.model.language_model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing .*\n.*thinker\.model\.layers\.1\.self_attn\.k_norm\.weight"):
        _convert(broken, config)

    broken = dict(thinker_only, **{"thinker.model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"unused\):\n.*thinker\.model\.layers\.0\.self_attn\.extra\.weight"):
        _convert(broken, config)

    broken = dict(thinker_only)
    broken["thinker.lm_head.weight"] = broken["thinker.lm_head.weight"][:, :-1]
    with pytest.raises(CheckpointError, match=r"thinker\.lm_head\.weight: checkpoint shape \(512, 63\), model expects \(512, 64\)"):
        _convert(broken, config)

    # A checkpoint with a talker and Code2Wav under a text-only configuration (Thinking/Captioner).
    with_speech = dict(tensors, **{"talker.model.norm.weight": np.ones(4, np.float32),
                                   "code2wav.pre_transformer.norm.weight": np.ones(4, np.float32)})
    with pytest.raises(CheckpointError, match="(?s)leaves out.*talker: 1 keys.*code2wav: 1 keys"):
        _convert(with_speech, config)
    _convert(with_speech, config, skip_absent_components=True)


def test_cli_converts_to_orbax_and_back_to_hub_layout(hub_checkpoint, tmp_path, rng):
    config, ref, hub = hub_checkpoint
    dst = tmp_path / "jax"
    assert hf_to_jax.main(["--src", hub, "--dst", str(dst), "--dtype", "float32"]) == 0
    assert json.loads((dst / "omni_jax.json").read_text())["format"] == 1
    converted = omni_jax.load_pretrained(dst, dtype="float32")
    ids, mask = left_padded_batch(rng, 2, 12, config.text.vocab_size, pads=(0, 2))
    direct = omni_jax.load_pretrained(hub, dtype="float32")
    np.testing.assert_array_equal(_logits(converted, ids, mask), _logits(direct, ids, mask))

    # omni_jax -> hub layout -> omni_jax is the identity on every implemented tensor.
    back = tmp_path / "hf"
    assert jax_to_hf.main(["--src", str(dst), "--dst", str(back)]) == 0
    with safetensors.safe_open(str(back / "model.safetensors"), "np") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}
    from convert.layout import normalize_key

    originals = {normalize_key(k): v for k, v in _tensors(ref).items()}
    compared = 0
    for key, value in exported.items():
        if ".mlp.experts." in key:  # per-expert keys: the reference keeps them fused in memory
            continue
        np.testing.assert_array_equal(value, originals[key], err_msg=key)
        compared += 1
    per_expert = sum(1 for k in originals if k.endswith(("gate_up_proj", "experts.down_proj")))
    assert compared == len(originals) - per_expert  # every other tensor, the encoders' included
    again = omni_jax.load_pretrained(back, dtype="float32")
    np.testing.assert_array_equal(_logits(again, ids, mask), _logits(converted, ids, mask))


def test_missing_folder_and_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        omni_jax.load_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(omni_jax.preset("tiny").to_hf_dict()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        omni_jax.load_pretrained(tmp_path)


def test_two_layouts_for_one_slot_and_a_key_in_two_files_are_errors(hub_checkpoint, tmp_path):
    config, ref, _ = hub_checkpoint
    tensors = _tensors(ref)
    fused = "thinker.model.language_model.layers.0.mlp.experts.gate_up_proj"
    inter = tensors[fused].shape[1] // 2
    # Layer 0's expert 3 given both fused and one tensor per expert: it would be filled twice.
    both = dict(tensors, **{"thinker.model.layers.0.mlp.experts.3.gate_proj.weight": tensors[fused][3, :inter]})
    twice = (r"appear twice.*\n.*experts\.3\.gate_proj\.weight \(also filled by "
             r"thinker\.model\.language_model\.layers\.0\.mlp\.experts\.gate_up_proj\)")
    with pytest.raises(CheckpointError, match=twice):
        _convert(both, config)
    # The same key in two safetensors files.
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    safetensors.torch.save_file(state, tmp_path / "a.safetensors")
    safetensors.torch.save_file({"thinker.lm_head.weight": state["thinker.lm_head.weight"]},
                                tmp_path / "b.safetensors")
    in_two = r"1 keys appear in two files:\n    thinker\.lm_head\.weight \(in a\.safetensors and b\.safetensors\)"
    with pytest.raises(CheckpointError, match=in_two):
        hf_to_jax.convert_checkpoint(str(tmp_path), config, dtype="float32")
