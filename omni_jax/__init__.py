"""omni_jax: Qwen3-Omni in JAX.

    import omni_jax
    model = omni_jax.load_pretrained("Qwen3-Omni-30B-A3B-Instruct", dtype="bfloat16")
    out = model.generate(input_ids, attention_mask, max_new_tokens=64)
"""

from omni_jax.config import OmniConfig, Runtime, load_config, preset
from omni_jax.model import GenerateOutput, OmniModel, load_pretrained

__all__ = ["OmniConfig", "Runtime", "load_config", "preset", "OmniModel", "GenerateOutput", "load_pretrained"]
__version__ = "0.1.0"
