"""`OmniModel`: the user-facing model (numpy in, numpy out) and `load_pretrained`.

    model = omni_jax.load_pretrained(path, dtype="bfloat16", mesh=None)
    logits = model.thinker_logits(input_ids, attention_mask)             # (B, S, vocab) numpy
    out = model.generate(input_ids, attention_mask, max_new_tokens=32)    # out.sequences (B, S + new)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import checkpoint, generate as gen, positions, sharding, thinker
from omni_jax.config import OmniConfig, Runtime, load_config
from omni_jax.nn import decoder
from omni_jax.nn.params import abstract_params, init_params

__all__ = ["OmniModel", "GenerateOutput", "model_specs", "load_pretrained"]

MULTIMODAL_KEYS = (
    "input_features", "feature_attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
    "video_grid_thw", "video_second_per_grid", "use_audio_in_video",
)


def model_specs(config: OmniConfig) -> dict:
    """ParamSpec tree of the implemented components (top-level keys as in the hub checkpoint)."""
    return {"thinker": thinker.thinker_specs(config.thinker_config)}


@dataclasses.dataclass
class GenerateOutput:
    sequences: np.ndarray  # (B, S + new) prompt (as given) followed by generated ids, pad after EOS
    audio: list[np.ndarray] | None = None  # 24 kHz float32 waveforms, when speech was asked for
    codes: np.ndarray | None = None
    num_generated: np.ndarray | None = None  # (B,) tokens generated per row, EOS included


def _bucket(length: int, multiple: int = 32) -> int:
    return max(multiple, -(-length // multiple) * multiple)


class OmniModel:
    """A Qwen3-Omni model with its parameters on a mesh."""

    def __init__(self, config: OmniConfig, params: dict, runtime: Runtime | None = None, mesh=None):
        self.config = config
        self.runtime = runtime or Runtime()
        self.mesh = mesh or sharding.default_mesh()
        self.params = params

    # ----------------------------------------------------------------------------------- builders
    @classmethod
    def random(cls, config: OmniConfig, seed: int = 0, runtime: Runtime | None = None, mesh=None) -> "OmniModel":
        """Randomly initialised model (std `initializer_range`), for tests and the embedded default."""
        runtime = runtime or Runtime()
        mesh = mesh or sharding.default_mesh()
        specs = model_specs(config)
        shardings = sharding.param_shardings(specs, mesh)
        init = jax.jit(
            functools.partial(init_params, specs, dtype=jnp.dtype(runtime.param_dtype)), out_shardings=shardings
        )
        return cls(config, init(jax.random.key(seed)), runtime, mesh)

    # ----------------------------------------------------------------------------------- checks
    def _check_inputs(self, input_ids, attention_mask, multimodal: dict[str, Any]):
        unknown = set(multimodal) - set(MULTIMODAL_KEYS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}; multimodal inputs are {MULTIMODAL_KEYS}")
        given = [k for k in MULTIMODAL_KEYS if multimodal.get(k) is not None and k != "use_audio_in_video"]
        if given:
            raise NotImplementedError(
                f"multimodal inputs {given} are not supported by this build yet: the audio and vision encoders "
                "are not implemented; pass text input_ids only"
            )
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        attention_mask = np.asarray(attention_mask).reshape(input_ids.shape).astype(np.int32)
        vocab = self.config.text.vocab_size
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab):
            raise ValueError(f"input_ids must lie in [0, {vocab}); got min {input_ids.min()}, max {input_ids.max()}")
        if np.any(attention_mask[:, 1:] < attention_mask[:, :-1]):
            raise ValueError("attention_mask must be left-padded (zeros only before the first real token of a row)")
        return input_ids.astype(np.int32), attention_mask

    # ----------------------------------------------------------------------------------- logits
    @functools.cached_property
    def _logits_fn(self):
        cfg, rt = self.config.thinker_config, self.runtime

        @jax.jit
        def fn(params, input_ids, attention_mask, position_ids):
            return thinker.forward(params, input_ids, attention_mask, position_ids, cfg, rt).logits

        return fn

    def thinker_logits(self, input_ids, attention_mask=None, **multimodal) -> np.ndarray:
        """Full logits (B, S, vocab) as float32 numpy; left-padded rows are supported."""
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, multimodal)
        position_ids, _ = positions.text_position_ids(attention_mask)
        logits = self._logits_fn(self.params["thinker"], input_ids, attention_mask, position_ids)
        return np.asarray(logits.astype(jnp.float32))

    # ----------------------------------------------------------------------------------- generate
    @functools.cached_property
    def _prefill_fn(self):
        cfg, rt = self.config.thinker_config, self.runtime
        dims = thinker.text_dims(cfg)

        @functools.partial(jax.jit, static_argnames=("max_len",))
        def fn(params, input_ids, attention_mask, position_ids, max_len):
            dtype = jnp.dtype(rt.dtype)
            cache = decoder.init_cache(dims, input_ids.shape[0], max_len, dtype)
            x = thinker.embed_tokens(params, input_ids, dtype)
            out = decoder.prefill(params["model"], x, position_ids, attention_mask, dims, rt, cache=cache)
            logits = thinker.lm_logits(params, out.hidden[:, -1:])[:, 0]
            return logits, out.cache

        return fn

    def _thinker_step(self, params, tokens_b, positions_3b1, cache, cache_index, key_valid):
        cfg, rt = self.config.thinker_config, self.runtime
        dtype = jnp.dtype(rt.dtype)
        x = thinker.embed_tokens(params, tokens_b[:, None], dtype)
        out = decoder.decode(
            params["model"], x, positions_3b1, cache, cache_index, key_valid, thinker.text_dims(cfg), rt
        )
        return thinker.lm_logits(params, out.hidden)[:, 0], out.cache

    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        return_audio: bool = False,
        speaker: str = "Ethan",
        **multimodal,
    ) -> GenerateOutput:
        """Generates up to `max_new_tokens` per row (left-padded batch), greedy or sampled.

        eos_token_id defaults to `<|im_end|>`; pad_token_id defaults to the text config's pad id, else
        the first EOS id. Returns numpy `sequences` (B, S + max_new_tokens).
        """
        del speaker
        if return_audio:
            raise NotImplementedError(
                "speech output (talker, code predictor, Code2Wav) is not implemented in this build; "
                "call generate(..., return_audio=False)"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, multimodal)
        sampling = gen.SamplingConfig(do_sample, temperature, top_k, top_p, repetition_penalty)
        eos_ids = (self.config.im_end_token_id,) if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())
        if pad_token_id is None:
            pad_token_id = self.config.text.pad_token_id if self.config.text.pad_token_id is not None else eos_ids[0]

        batch, prompt_len = input_ids.shape
        if prompt_len + max_new_tokens > self.config.text.max_position_embeddings:
            raise ValueError(
                f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's context of "
                f"{self.config.text.max_position_embeddings} tokens; shorten the prompt or max_new_tokens"
            )
        # Left-pad to a bucket so that batches of similar lengths share one compilation.
        bucket = _bucket(prompt_len)
        pad = bucket - prompt_len
        ids_b = np.pad(input_ids, ((0, 0), (pad, 0)), constant_values=pad_token_id)
        mask_b = np.pad(attention_mask, ((0, 0), (pad, 0)))
        position_ids, _ = positions.text_position_ids(mask_b)
        max_len = bucket + max_new_tokens

        params = self.params["thinker"]
        logits, cache = self._prefill_fn(params, ids_b, mask_b, position_ids, max_len=max_len)
        vocab = self.config.text.vocab_size
        # The reference's repetition penalty sees the prompt as given (its padding included).
        seen = np.zeros((batch, vocab), bool)
        np.put_along_axis(seen, input_ids, True, axis=1)
        seen = jnp.asarray(seen)
        key = jax.random.key(seed)
        key, sub = jax.random.split(key)
        first = gen.sample_next(logits, seen, sub, sampling)
        done = jnp.zeros((batch,), bool)
        first, done = gen.finish_token(first, done, eos_ids, pad_token_id)
        key_valid = jnp.concatenate([jnp.asarray(mask_b, bool), jnp.zeros((batch, max_new_tokens), bool)], axis=1)
        state = gen.DecodeState(
            step=jnp.int32(1),
            tokens=jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first),
            last_token=first,
            done=done,
            seen=gen.mark_seen(seen, first),
            cache=cache,
            key_valid=key_valid,
            next_position=jnp.asarray(position_ids[:, :, -1] + 1.0),
            key=key,
        )
        state = gen.decode_loop(
            state, params, step_fn=self._thinker_step, prompt_len=bucket, sampling=sampling,
            eos_ids=eos_ids, pad_id=int(pad_token_id),
        )
        steps = int(state.step)
        tokens = np.array(state.tokens)
        tokens[:, steps:] = pad_token_id
        num_generated = np.where(
            np.any(np.isin(tokens, eos_ids), axis=1), np.argmax(np.isin(tokens, eos_ids), axis=1) + 1, steps
        )
        return GenerateOutput(sequences=np.concatenate([input_ids, tokens], axis=1), num_generated=num_generated)


def load_pretrained(
    path: str | os.PathLike,
    dtype: str = "bfloat16",
    mesh=None,
    *,
    runtime: Runtime | None = None,
    skip_unimplemented: bool = False,
) -> OmniModel:
    """Loads a Hugging Face checkpoint folder (config.json + *.safetensors) or a converted one.

    dtype: parameter and compute dtype ("bfloat16" or "float32").
    skip_unimplemented: a Hugging Face checkpoint's keys of components this build does not implement
      are an error listing them, unless this is set.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    config = load_config(path)
    runtime = runtime or Runtime(dtype=dtype, param_dtype=dtype)
    mesh = mesh or sharding.default_mesh()
    specs = model_specs(config)
    shardings = sharding.param_shardings(specs, mesh)
    if checkpoint.is_omni_jax_checkpoint(path):
        abstract = abstract_params(specs, jnp.dtype(runtime.param_dtype))
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        params = checkpoint.restore_params(path, abstract)
    else:
        from convert.hf_to_jax import convert_checkpoint  # noqa: PLC0415

        params = convert_checkpoint(
            path, config, dtype=runtime.param_dtype, skip_unimplemented=skip_unimplemented, shardings=shardings
        )
    return OmniModel(config, params, runtime, mesh)
