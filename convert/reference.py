"""The PyTorch reference (transformers `qwen3_omni_moe`), built from an omni_jax config.

Tools and tests only: the library never imports torch. Requires `torch` and `transformers`
(the `test` extra).
"""

from __future__ import annotations

import contextlib

from typing import Iterator

import numpy as np

from omni_jax.config import OmniConfig

__all__ = ["hf_config", "reference_model", "randomize_", "state_dict_tensors"]


def hf_config(config: OmniConfig):
    """The transformers `Qwen3OmniMoeConfig` equal to `config`."""
    from transformers import Qwen3OmniMoeConfig  # noqa: PLC0415

    return Qwen3OmniMoeConfig(**{k: v for k, v in config.to_hf_dict().items() if k not in ("model_type", "architectures")})


def reference_model(config: OmniConfig, *, thinker_only: bool = False, seed: int = 0, attn_implementation="eager"):
    """A randomly initialised reference model in fp32 eval mode.

    thinker_only: build `Qwen3OmniMoeThinkerForConditionalGeneration` (state-dict keys `model.*`,
    `lm_head.*`) instead of the whole `Qwen3OmniMoeForConditionalGeneration`.
    """
    import torch  # noqa: PLC0415
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling  # noqa: PLC0415

    cfg = hf_config(config)
    torch.manual_seed(seed)
    if thinker_only:
        thinker_cfg = cfg.thinker_config
        thinker_cfg._attn_implementation = attn_implementation
        model = modeling.Qwen3OmniMoeThinkerForConditionalGeneration(thinker_cfg)
    else:
        cfg._attn_implementation = attn_implementation
        model = modeling.Qwen3OmniMoeForConditionalGeneration(cfg)
    return model.eval().float()


@contextlib.contextmanager
def talker_penalty_over_all_generated_tokens():
    """Within this block the reference applies its repetition penalty to every generated token of every
    row, as its batch-1 talker does (and as omni_jax does at any batch size).

    transformers 5.23.0 gives the repetition penalty `prompt_ignore_length` = each row's left padding in
    the attention mask, meant to skip the padded prompt inside `input_ids`. The talker is generated from
    `inputs_embeds`, so `input_ids` holds only generated tokens: a row whose talker prompt has P padding
    positions (its user part shorter than the batch's longest) does not penalise its first P generated
    codes. Its speech then depends on its batch mates. Batched parity tests run the reference under this
    block so that they compare with its single-row behaviour.
    """
    from transformers.generation import logits_process

    cls = logits_process.RepetitionPenaltyLogitsProcessor
    original = cls.__init__

    def without_prompt_ignore(self, penalty, prompt_ignore_length=None):
        original(self, penalty, prompt_ignore_length=None)

    cls.__init__ = without_prompt_ignore
    try:
        yield
    finally:
        cls.__init__ = original


def randomize_(model, seed: int = 0, std: float = 0.05) -> None:
    """Re-draws every parameter (norm scales around 1) so that no weight is trivially 0 or 1."""
    import torch  # noqa: PLC0415

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name or name.endswith(("ln_q.weight", "ln_post.weight")):
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(std * noise)


def state_dict_tensors(model) -> Iterator[tuple[str, object, tuple[int, ...]]]:
    """(key, load, shape) triples of a torch module's state dict, for `convert.hf_to_jax.convert_tensors`."""
    for key, t in model.state_dict().items():
        yield key, (lambda t=t: t.detach().float().numpy().astype(np.float32)), tuple(t.shape)
