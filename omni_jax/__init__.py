"""omni_jax: Qwen3-Omni in JAX.

    import omni_jax
    model = omni_jax.load_pretrained("Qwen3-Omni-30B-A3B-Instruct", dtype="bfloat16")
    out = model.generate(input_ids, attention_mask, max_new_tokens=64)

Top-level names are imported lazily, so that `omni_jax.processing` (numpy only) loads without jax.
"""

import importlib

__all__ = ["OmniConfig", "Runtime", "load_config", "preset", "OmniModel", "GenerateOutput", "load_pretrained", "MeshConfig"]
__version__ = "0.1.0"

_WHERE = {
    "OmniConfig": "omni_jax.config", "Runtime": "omni_jax.config", "load_config": "omni_jax.config",
    "preset": "omni_jax.config", "OmniModel": "omni_jax.model", "GenerateOutput": "omni_jax.model",
    "load_pretrained": "omni_jax.model", "MeshConfig": "omni_jax.sharding",
}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'omni_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
