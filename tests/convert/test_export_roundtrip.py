"""Export round trip through the reference (issue 7, item 4): every component, talker and Code2Wav included.

An omni_jax model of the tiny preset with talker, code predictor and Code2Wav, with random parameters
(drawn with numpy so that every entry, norm scales and biases included, is distinct from 0 and 1; the
jitted `OmniModel.random` initialiser takes minutes to compile on a small CPU box) is saved as an
omni_jax checkpoint, exported with `python -m convert.jax_to_hf` into several safetensors files, and:

  * loaded by transformers `Qwen3OmniMoeForConditionalGeneration.from_pretrained` with no missing,
    unexpected or mis-shaped key, every reference tensor equal to the omni_jax parameter it came from;
  * read back by omni_jax (directly and through `python -m convert.hf_to_jax`): identical parameters;
  * in bfloat16 too: JAX -> HF -> JAX is exact.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from convert import hf_to_jax, jax_to_hf
from omni_jax import checkpoint
from omni_jax.config import preset
from omni_jax.model import OmniModel, model_specs
from omni_jax.nn.params import flatten, unflatten
from tests.conftest import FP32


def _random_params(config, dtype, seed=0) -> dict:
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    return unflatten({path: jnp.asarray(rng.standard_normal(spec.shape, np.float32), dtype)
                      for path, spec in flatten(model_specs(config)).items()})


def _assert_same_params(a: dict, b: dict):
    fa, fb = flatten(a), flatten(b)
    assert set(fa) == set(fb)
    for path in fa:
        x, y = np.asarray(fa[path]), np.asarray(fb[path])
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(x, y, err_msg=path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(config, params, omni_jax checkpoint folder, exported hub-layout folder)."""
    config = preset("tiny")
    assert config.talker_config is not None and config.code2wav_config is not None
    model = OmniModel(config, _random_params(config, "float32"), FP32)
    root = tmp_path_factory.mktemp("export")
    ckpt, hf = str(root / "jax"), str(root / "hf")
    checkpoint.save_params(ckpt, model.params, config, "float32")
    # Small files, so that the sharded layout (index + several files) is what gets loaded.
    assert jax_to_hf.main(["--src", ckpt, "--dst", hf, "--shard-gb", str(0.5 / 1024)]) == 0
    return config, model.params, ckpt, hf


def test_export_covers_every_component_in_several_files(exported):
    config, params, _, hf = exported
    with open(os.path.join(hf, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1
    for prefix in ("thinker.audio_tower.", "thinker.visual.", "thinker.model.", "thinker.lm_head.",
                   "talker.model.", "talker.code_predictor.", "talker.codec_head.", "code2wav."):
        assert any(k.startswith(prefix) for k in weight_map), prefix
    assert "talker.model.layers.0.mlp.experts.0.gate_proj.weight" in weight_map  # hub layout
    with open(os.path.join(hf, "config.json")) as f:
        assert json.load(f) == config.to_hf_dict()


def test_reference_loads_the_export_strictly_and_equal(exported):
    import torch
    from transformers import Qwen3OmniMoeForConditionalGeneration

    config, params, _, hf = exported
    ref, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(hf, output_loading_info=True,
                                                                    dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info["error_msgs"]
    state = ref.state_dict()
    assert any(k.startswith("talker.") for k in state) and any(k.startswith("code2wav.") for k in state)

    # Every reference tensor, read back through the strict converter, is the parameter it came from.
    triples = [(k, (lambda v=v: v.detach().numpy()), tuple(v.shape)) for k, v in state.items()]
    back = unflatten(hf_to_jax.convert_tensors(triples, model_specs(config), dtype="float32"))
    _assert_same_params(back, params)
    assert sum(p.numel() for p in ref.parameters()) == sum(np.asarray(v).size for v in flatten(params).values())

    # A few spot checks by hand, independent of the name map: transposes and the fused expert layout.
    p = flatten(params)
    np.testing.assert_array_equal(state["thinker.lm_head.weight"].numpy(), np.asarray(p["thinker/lm_head/kernel"]).T)
    gate_up = state["talker.model.layers.1.mlp.experts.gate_up_proj"].numpy()  # (E, 2I, H), gate rows first
    inter = gate_up.shape[1] // 2
    experts = "talker/model/layers/mlp/experts/"
    np.testing.assert_array_equal(gate_up[2, :inter], np.asarray(p[experts + "gate_proj"])[1, 2].T)
    np.testing.assert_array_equal(gate_up[2, inter:], np.asarray(p[experts + "up_proj"])[1, 2].T)
    np.testing.assert_array_equal(state["code2wav.code_embedding.weight"].numpy(),
                                  np.asarray(p["code2wav/code_embedding/weight"]))


def test_jax_to_hf_to_jax_is_exact(exported, tmp_path):
    import omni_jax

    config, params, _, hf = exported
    direct = omni_jax.load_pretrained(hf, dtype="float32")  # the sharded loader, one device
    _assert_same_params(direct.params, params)
    assert hf_to_jax.main(["--src", hf, "--dst", str(tmp_path / "jax2"), "--dtype", "float32"]) == 0
    _assert_same_params(omni_jax.load_pretrained(tmp_path / "jax2", dtype="float32").params, params)


def test_bfloat16_round_trip_is_exact(tmp_path):
    import omni_jax

    config = preset("tiny")
    params = _random_params(config, "bfloat16", seed=1)
    jax_to_hf.export_params(params, model_specs(config), str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    loaded = omni_jax.load_pretrained(tmp_path, dtype="bfloat16")
    _assert_same_params(loaded.params, params)
