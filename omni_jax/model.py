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

from omni_jax import audio_encoder, checkpoint, code2wav, generate as gen, positions, sharding, thinker, vision_encoder
from omni_jax import speech, talker as talker_lib
from omni_jax.config import OmniConfig, Runtime, load_config
from omni_jax.nn import decoder
from omni_jax.nn.params import abstract_params, init_params_host

__all__ = ["OmniModel", "GenerateOutput", "model_specs", "load_pretrained"]

MULTIMODAL_KEYS = (
    "input_features", "feature_attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
    "video_grid_thw", "video_second_per_grid", "use_audio_in_video",
)


def model_specs(config: OmniConfig) -> dict:
    """ParamSpec tree of every component the configuration has (top-level keys as in the hub checkpoint).

    The thinker (with its audio tower and vision encoder) always; the talker (with its code
    predictor) and Code2Wav when the configuration has them (Instruct, not Thinking/Captioner).
    """
    specs = {"thinker": thinker.thinker_specs(config.thinker_config)}
    if config.talker_config is not None:
        specs["talker"] = talker_lib.talker_specs(config.talker_config)
    if config.code2wav_config is not None:
        specs["code2wav"] = code2wav.code2wav_specs(config.code2wav_config)
    return specs


@dataclasses.dataclass
class GenerateOutput:
    sequences: np.ndarray  # (B, S + new) prompt (as given) followed by generated ids, pad after EOS
    audio: list[np.ndarray] | None = None  # 24 kHz float32 waveforms, when speech was asked for
    codes: np.ndarray | None = None
    num_generated: np.ndarray | None = None  # (B,) tokens generated per row, EOS included
    audio_stream: Any = None  # with return_audio="stream": an iterator of speech.StreamChunk(row, audio, final)


def _bucket(length: int, multiple: int = 32) -> int:
    return max(multiple, -(-length // multiple) * multiple)


def _has_media(multimodal: dict[str, Any]) -> bool:
    return any(multimodal.get(k) is not None for k in ("input_features", "pixel_values", "pixel_values_videos"))


def _row_bucket(n: int) -> int:
    """Rows rounded up to four sizes per octave (<= 25% padding), at least 16."""
    if n <= 16:
        return 16
    step = 1 << max(0, (n - 1).bit_length() - 3)
    return -(-n // step) * step


def _pad_rows(x, axis: int = 0):
    """Pads encoder outputs along `axis` to `_row_bucket` rows so the thinker compiles per bucket, not per
    media size (`thinker.scatter_rows` reads only as many rows as there are placeholders)."""
    if x is None:
        return None
    n = x.shape[axis]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, _row_bucket(n) - n)
    return jnp.pad(x, widths)


def _under_mesh(method):
    """Runs a method under `jax.set_mesh(self.mesh)` (multi-device meshes only; see `sharding.use_mesh`),
    so that the programs it traces see the mesh (activation constraints, expert parallelism)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with sharding.use_mesh(self.mesh):
            return method(self, *args, **kwargs)

    return wrapper


class OmniModel:
    """A Qwen3-Omni model with its parameters on a mesh."""

    def __init__(self, config: OmniConfig, params: dict, runtime: Runtime | None = None, mesh=None):
        """mesh: a `jax.sharding.Mesh`, a `sharding.MeshConfig` or None (one device). Jitted calls run
        under it (`jax.set_mesh`), with the batch split over its data and expert axes."""
        self.config = config
        self.runtime = runtime or Runtime()
        self.mesh = sharding.mesh_and_rules(mesh)[0]
        self.params = params

    # ----------------------------------------------------------------------------------- builders
    @classmethod
    def random(cls, config: OmniConfig, seed: int = 0, runtime: Runtime | None = None, mesh=None) -> "OmniModel":
        """Randomly initialised model (std `initializer_range`), for tests and the embedded default.

        mesh: a Mesh, a `sharding.MeshConfig` (with `fsdp=True` parameters are also split over `data`)
        or None (one device). Parameters are created directly in their shardings."""
        runtime = runtime or Runtime()
        mesh, rules = sharding.mesh_and_rules(mesh)
        specs = model_specs(config)
        shardings = sharding.param_shardings(specs, mesh, rules)
        # Drawn on the host shard by shard: jitting hundreds of random draws compiles for minutes.
        params = init_params_host(specs, seed, jnp.dtype(runtime.param_dtype), shardings)
        return cls(config, params, runtime, mesh)

    # ----------------------------------------------------------------------------------- checks
    def _check_inputs(self, input_ids, attention_mask, multimodal: dict[str, Any]):
        unknown = set(multimodal) - set(MULTIMODAL_KEYS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}; multimodal inputs are {MULTIMODAL_KEYS}")
        pairs = (("input_features", "feature_attention_mask"), ("pixel_values", "image_grid_thw"),
                 ("pixel_values_videos", "video_grid_thw"))
        for data, meta in pairs:
            if (multimodal.get(data) is None) != (multimodal.get(meta) is None):
                raise ValueError(f"{data} and {meta} come together (as the processor returns them); got only one")
        if multimodal.get("pixel_values_videos") is not None and multimodal.get("video_second_per_grid") is None:
            raise ValueError("pixel_values_videos needs video_second_per_grid (seconds per temporal grid step, "
                             "from the processor)")
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

    # ----------------------------------------------------------------------------------- media
    def _encode_media(self, input_ids: np.ndarray, multimodal: dict[str, Any]) -> thinker.MediaEmbeds | None:
        """Runs the audio and vision encoders; outputs padded to row buckets (see `_pad_rows`)."""
        if not _has_media(multimodal):
            return None
        cfg, rt = self.config.thinker_config, self.runtime
        p = self.params["thinker"]
        audio = image = video = image_ds = video_ds = None

        def check_count(name, token_id, rows):
            expected = int(np.sum(input_ids == token_id))
            if rows != expected:
                raise ValueError(
                    f"{name}: the encoder produced {rows} embeddings but input_ids hold {expected} placeholder "
                    f"tokens (id {token_id}); build input_ids and the media with the same processor call"
                )

        for name, key, token_id in (("audio", "input_features", cfg.audio_token_id),
                                    ("images", "pixel_values", cfg.image_token_id),
                                    ("videos", "pixel_values_videos", cfg.video_token_id)):
            if multimodal.get(key) is None and (count := int(np.sum(input_ids == token_id))):
                raise ValueError(f"input_ids hold {count} {name} placeholder tokens (id {token_id}) but no {key} "
                                 "was given")
        if multimodal.get("input_features") is not None:
            audio, counts = audio_encoder.encode_batched(
                p["audio_tower"], np.asarray(multimodal["input_features"], np.float32),
                np.asarray(multimodal["feature_attention_mask"]), cfg.audio_config, rt)
            check_count("audio", cfg.audio_token_id, int(np.sum(counts)))
        if multimodal.get("pixel_values") is not None:
            image, image_ds = vision_encoder.encode(
                p["visual"], np.asarray(multimodal["pixel_values"], np.float32),
                np.asarray(multimodal["image_grid_thw"]), cfg.vision_config, rt)
            check_count("images", cfg.image_token_id, image.shape[0])
        if multimodal.get("pixel_values_videos") is not None:
            video, video_ds = vision_encoder.encode(
                p["visual"], np.asarray(multimodal["pixel_values_videos"], np.float32),
                np.asarray(multimodal["video_grid_thw"]), cfg.vision_config, rt)
            check_count("videos", cfg.video_token_id, video.shape[0])
        pad = _pad_rows
        return thinker.MediaEmbeds(
            audio=pad(audio), image=pad(image), video=pad(video),
            image_deepstack=pad(image_ds, axis=1), video_deepstack=pad(video_ds, axis=1),
        )

    def _positions(self, input_ids, attention_mask, multimodal) -> np.ndarray:
        """(3, B, S) float32 TM-RoPE position ids (text-only rows: the plain text rule)."""
        if _has_media(multimodal):
            return positions.position_ids_for_inputs(input_ids, attention_mask, self.config.thinker_config,
                                                     **multimodal)[0]
        return positions.text_position_ids(attention_mask)[0]

    # ----------------------------------------------------------------------------------- logits
    @functools.cached_property
    def _logits_fn(self):
        cfg, rt = self.config.thinker_config, self.runtime

        @functools.partial(jax.jit, static_argnames=("use_deepstack",))
        def fn(params, input_ids, attention_mask, position_ids, media, use_deepstack=True):
            return thinker.forward(params, input_ids, attention_mask, position_ids, cfg, rt, media=media,
                                   use_deepstack=use_deepstack).logits

        return fn

    @_under_mesh
    def thinker_logits(self, input_ids, attention_mask=None, *, use_deepstack: bool = True, **multimodal) -> np.ndarray:
        """Full logits (B, S, vocab) as float32 numpy; left-padded rows are supported.

        `**multimodal` takes the reference processor's keys (`input_features`, `feature_attention_mask`,
        `pixel_values`, `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`,
        `video_second_per_grid`, `use_audio_in_video`). `use_deepstack=False` is an ablation.
        """
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, multimodal)
        media = self._encode_media(input_ids, multimodal)
        position_ids = self._positions(input_ids, attention_mask, multimodal)
        ids, mask, pos = self._shard_batch(input_ids, attention_mask, position_ids)
        logits = self._logits_fn(self.params["thinker"], ids, mask, pos, media, use_deepstack=use_deepstack)
        return np.asarray(logits.astype(jnp.float32))

    def _shard_batch(self, input_ids, attention_mask, position_ids):
        """(B, S) ids and mask, (3, B, S) positions onto the mesh, rows split over (data, expert) as far as
        B divides (host arrays as they are on one device)."""
        if self.mesh.size == 1:
            return input_ids, attention_mask, position_ids
        return (sharding.shard_batch(input_ids, self.mesh), sharding.shard_batch(attention_mask, self.mesh),
                sharding.shard_batch(position_ids, self.mesh, batch_dim=1))

    # ----------------------------------------------------------------------------------- generate
    @functools.cached_property
    def _prefill_fn(self):
        cfg, rt = self.config.thinker_config, self.runtime
        dims = thinker.text_dims(cfg)

        @functools.partial(jax.jit, static_argnames=("max_len", "capture_layer"))
        def fn(params, input_ids, attention_mask, position_ids, media, max_len, capture_layer=None):
            """-> (last logits (B, V), cache, states (B, S, 2, D) = [embeddings, hidden_states[capture_layer]]
            or None)."""
            dtype = jnp.dtype(rt.dtype)
            cache = decoder.init_cache(dims, input_ids.shape[0], max_len, dtype)
            x = thinker.embed_tokens(params, input_ids, dtype)
            deepstack = None
            if media is not None:
                x, deepstack = thinker.merge_media(x, input_ids, media, cfg)
            out = decoder.prefill(params["model"], x, position_ids, attention_mask, dims, rt, cache=cache,
                                  deepstack_nbsd=deepstack, capture_layer=capture_layer)
            logits = thinker.lm_logits(params, out.hidden[:, -1:])[:, 0]
            states = None if capture_layer is None else jnp.stack([x, out.captured], axis=2)
            return logits, out.cache, states

        return fn

    def _thinker_step(self, params, tokens_b, positions_3b1, cache, cache_index, key_valid):
        cfg, rt = self.config.thinker_config, self.runtime
        dtype = jnp.dtype(rt.dtype)
        x = thinker.embed_tokens(params, tokens_b[:, None], dtype)
        out = decoder.decode(
            params["model"], x, positions_3b1, cache, cache_index, key_valid, thinker.text_dims(cfg), rt
        )
        return thinker.lm_logits(params, out.hidden)[:, 0], out.cache

    @_under_mesh
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
        return_audio: bool | str = False,
        speaker: str | list[str] = "Ethan",
        stream_chunk_frames: int = 8,
        max_audio_frames: int = 4095,
        talker_suppress_tokens=None,
        **multimodal,
    ) -> GenerateOutput:
        """Generates up to `max_new_tokens` per row (left-padded batch), greedy or sampled.

        eos_token_id defaults to `<|im_end|>`; pad_token_id defaults to the text config's pad id, else
        the first EOS id. Returns numpy `sequences` (B, S + max_new_tokens).
        `**multimodal`: the reference processor's keys, as in `thinker_logits`.
        return_audio: also speak the answer (talker -> code predictor -> Code2Wav) with `speaker` (one
        name or one per row); `out.audio` holds one 24 kHz waveform per row, `out.codes` the codec frames.
        return_audio="stream": the text is generated at once and `out.audio_stream` yields
        `speech.StreamChunk(row, audio, final)` every `stream_chunk_frames` codec frames, seamless (a row's
        chunks concatenated equal one full causal decode of its frames, not the reference's chunked seams).
        do_sample=False makes the speech greedy too; sampling uses the reference's talker defaults.
        talker_suppress_tokens: codebook-0 ids the talker may not emit (default: the reference's
        `[vocab - 1024, vocab)` minus the codec EOS, which for the tiny preset leaves only EOS).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, multimodal)
        speakers = self._check_speech(return_audio, speaker, input_ids.shape[0])
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
        position_ids = self._positions(ids_b, mask_b, multimodal)
        media = self._encode_media(ids_b, multimodal)
        max_len = bucket + max_new_tokens
        # Speech needs the thinker's input embeddings and `accept_hidden_layer` states at the prompt
        # positions (the reference's talker reads no hidden state of a generated token; their input
        # embeddings are token embeddings): captured during prefill rather than recomputed.
        capture_layer = self.config.talker_config.accept_hidden_layer if return_audio else None

        params = self.params["thinker"]
        logits, cache, prompt_states = self._prefill_fn(params, *self._shard_batch(ids_b, mask_b, position_ids), media,
                                                        max_len=max_len, capture_layer=capture_layer)
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
        sequences = np.concatenate([input_ids, tokens], axis=1)
        if not return_audio:
            return GenerateOutput(sequences=sequences, num_generated=num_generated)
        states = prompt_states[:, pad:]  # (B, S, 2, D)
        speech_kwargs = dict(
            prompt_ids=input_ids, prompt_mask=attention_mask,
            sequences=sequences, thinker_embeds=states[:, :, 0], thinker_hidden=states[:, :, 1],
            speakers=speakers, greedy=not do_sample, seed=seed, max_frames=max_audio_frames,
            multimodal=multimodal, thinker_eos_token_id=eos_ids, suppress_tokens=talker_suppress_tokens,
        )
        if return_audio == "stream":
            stream = speech.stream_speak(self.params, self.config, self.runtime, chunk_frames=stream_chunk_frames,
                                         **speech_kwargs)
            return GenerateOutput(sequences=sequences, num_generated=num_generated, audio_stream=stream)
        speech_out = speech.speak(self.params, self.config, self.runtime, **speech_kwargs)
        return GenerateOutput(sequences=sequences, audio=speech_out.audio, codes=speech_out.codes,
                              num_generated=num_generated)

    def _check_speech(self, return_audio, speaker, batch: int):
        """Fails before the thinker runs: bad return_audio, no talker, unknown speaker or wrong count."""
        if return_audio not in (False, True, "stream"):
            raise ValueError(f"return_audio must be False, True or 'stream', got {return_audio!r}")
        if not return_audio:
            return None
        speech.check_speech_config(self.config)
        speech.speaker_ids(self.config, speaker, batch)  # raises listing the valid speakers
        return speaker


def load_pretrained(
    path: str | os.PathLike,
    dtype: str = "bfloat16",
    mesh=None,
    *,
    runtime: Runtime | None = None,
    skip_absent_components: bool = False,
) -> OmniModel:
    """Loads a Hugging Face checkpoint folder (config.json + *.safetensors) or a converted one.

    dtype: parameter and compute dtype ("bfloat16" or "float32").
    mesh: a Mesh, a `sharding.MeshConfig` (`fsdp=True` also splits parameters over `data`) or None.
    skip_absent_components: a Hugging Face checkpoint's keys of components the configuration leaves out
      are an error listing them, unless this is set.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    config = load_config(path)
    runtime = runtime or Runtime(dtype=dtype, param_dtype=dtype)
    mesh, rules = sharding.mesh_and_rules(mesh)
    specs = model_specs(config)
    shardings = sharding.param_shardings(specs, mesh, rules)
    if checkpoint.is_omni_jax_checkpoint(path):
        abstract = abstract_params(specs, jnp.dtype(runtime.param_dtype))
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        params = checkpoint.restore_params(path, abstract)
    else:
        from convert.hf_to_jax import convert_checkpoint  # noqa: PLC0415

        params = convert_checkpoint(
            path, config, dtype=runtime.param_dtype, skip_absent_components=skip_absent_components, shardings=shardings
        )
    return OmniModel(config, params, runtime, mesh)
