"""Frozen configuration dataclasses for every Qwen3-Omni component.

Each dataclass mirrors one Hugging Face config class of `transformers.models.qwen3_omni_moe`. Field
names are the config.json keys, and the defaults are the *reference class defaults* (several of them
are stale for the published checkpoint, e.g. `position_id_per_seconds=25`): a config.json that states
a value always wins, and one that omits it gets what the reference would use. The real checkpoint's
values live in the `qwen3-omni-30b-a3b-instruct` preset.

Rotary settings are read from both serialisations: transformers 4.57 (`rope_theta` at the top level
plus `rope_scaling={"mrope_section": ...}`) and 5.x (`rope_parameters={"rope_theta": ...,
"mrope_section": ...}`), and written back in the 5.x form.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

__all__ = [
    "ThinkerTextConfig",
    "AudioEncoderConfig",
    "VisionEncoderConfig",
    "ThinkerConfig",
    "TalkerTextConfig",
    "CodePredictorConfig",
    "TalkerConfig",
    "Code2WavConfig",
    "OmniConfig",
    "Runtime",
    "PRESETS",
    "preset",
    "load_config",
]


class ConfigError(ValueError):
    """A config.json value that cannot be used, with the key that is wrong."""


def _rope_fields(raw: Mapping[str, Any], default_theta: float | None) -> dict[str, Any]:
    """Extracts `rope_theta` and `mrope_section` from either rope serialisation."""
    out: dict[str, Any] = {}
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"rope_parameters/rope_scaling must be a mapping, got {type(params).__name__}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "axial", "mrope"):
        raise ConfigError(
            f"rope type {rope_type!r} is not supported (Qwen3-Omni uses 'default'); "
            "check the checkpoint's rope_parameters"
        )
    theta = params.get("rope_theta", raw.get("rope_theta", default_theta))
    if theta is not None:
        out["rope_theta"] = float(theta)
    if "mrope_section" in params:
        out["mrope_section"] = tuple(int(s) for s in params["mrope_section"])
    return out


def _build(cls, raw: Mapping[str, Any] | None, **overrides):
    """Builds dataclass `cls` from a config.json mapping: known keys are taken, unknown ones ignored."""
    raw = dict(raw or {})
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key in names:
            if isinstance(value, list):
                value = tuple(value)
            if isinstance(value, dict) and key == "speaker_id":
                value = tuple(sorted((str(k).lower(), int(v)) for k, v in value.items()))
            kwargs[key] = value
    kwargs.update(overrides)
    return cls(**kwargs)


def _to_dict(cfg) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = value.to_hf_dict()
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


@dataclasses.dataclass(frozen=True)
class ThinkerTextConfig:
    """The thinker's MoE decoder (`Qwen3OmniMoeTextConfig`)."""

    vocab_size: int = 3584
    hidden_size: int = 2048
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (24, 20, 20)
    attention_bias: bool = False
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    num_experts: int = 128
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    mlp_only_layers: tuple[int, ...] = ()
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ConfigError(
                f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r}: only 'silu' is implemented")
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ConfigError("num_experts_per_tok must not exceed num_experts")

    def is_moe_layer(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def all_layers_moe(self) -> bool:
        return all(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> "ThinkerTextConfig":
        return _build(cls, raw, **_rope_fields(raw, 1_000_000.0))

    def to_hf_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        out.pop("rope_theta"), out.pop("mrope_section")
        out["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "mrope_section": list(self.mrope_section),
            "interleaved": True,
            "mrope_interleaved": True,
        }
        out["tie_word_embeddings"] = False
        return out


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
    """The AuT audio encoder (`Qwen3OmniMoeAudioEncoderConfig`)."""

    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    activation_function: str = "gelu"
    max_source_positions: int = 1500
    n_window: int = 50
    output_dim: int = 3584
    n_window_infer: int = 800
    conv_chunksize: int = 500
    downsample_hidden_size: int = 480
    initializer_range: float = 0.02

    @classmethod
    def from_hf_dict(cls, raw):
        return _build(cls, raw)

    def to_hf_dict(self):
        return _to_dict(self)


@dataclasses.dataclass(frozen=True)
class VisionEncoderConfig:
    """The vision encoder with DeepStack mergers (`Qwen3OmniMoeVisionEncoderConfig`)."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10_000.0
    initializer_range: float = 0.02

    @classmethod
    def from_hf_dict(cls, raw):
        return _build(cls, raw, **_rope_fields(raw, 10_000.0))

    def to_hf_dict(self):
        out = _to_dict(self)
        # transformers 5 reads the vision rotary base from `rope_parameters` (type "axial").
        out["rope_parameters"] = {"rope_type": "axial", "rope_theta": out.pop("rope_theta")}
        return out


@dataclasses.dataclass(frozen=True)
class ThinkerConfig:
    """Thinker = audio encoder + vision encoder + text decoder (`Qwen3OmniMoeThinkerConfig`)."""

    text_config: ThinkerTextConfig = dataclasses.field(default_factory=ThinkerTextConfig)
    audio_config: AudioEncoderConfig = dataclasses.field(default_factory=AudioEncoderConfig)
    vision_config: VisionEncoderConfig = dataclasses.field(default_factory=VisionEncoderConfig)
    position_id_per_seconds: int = 25
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    user_token_id: int = 872
    initializer_range: float = 0.02

    @classmethod
    def from_hf_dict(cls, raw):
        raw = dict(raw or {})
        return _build(
            cls,
            {k: v for k, v in raw.items() if not k.endswith("_config")},
            text_config=ThinkerTextConfig.from_hf_dict(raw.get("text_config") or {}),
            audio_config=AudioEncoderConfig.from_hf_dict(raw.get("audio_config") or {}),
            vision_config=VisionEncoderConfig.from_hf_dict(raw.get("vision_config") or {}),
        )

    def to_hf_dict(self):
        out = _to_dict(self)
        out["tie_word_embeddings"] = False
        return out


@dataclasses.dataclass(frozen=True)
class TalkerTextConfig:
    """The talker's MoE decoder with its shared expert (`Qwen3OmniMoeTalkerTextConfig`)."""

    vocab_size: int = 3072
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    mrope_section: tuple[int, ...] = (24, 20, 20)
    attention_bias: bool = False
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 384
    num_experts_per_tok: int = 8
    num_experts: int = 128
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int | None = None
    router_aux_loss_coef: float = 0.001
    mlp_only_layers: tuple[int, ...] = ()
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_hf_dict(cls, raw):
        raw = dict(raw)
        if "num_local_experts" in raw and "num_experts" not in raw:
            raw["num_experts"] = raw["num_local_experts"]
        return _build(cls, raw, **_rope_fields(raw, 10_000.0))

    def to_hf_dict(self):
        out = _to_dict(self)
        out.pop("rope_theta"), out.pop("mrope_section")
        out["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "mrope_section": list(self.mrope_section),
            "interleaved": True,
            "mrope_interleaved": True,
        }
        return out


@dataclasses.dataclass(frozen=True)
class CodePredictorConfig:
    """The multi-token code predictor (`Qwen3OmniMoeTalkerCodePredictorConfig`)."""

    vocab_size: int = 2048
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 5
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    attention_bias: bool = False
    num_code_groups: int = 32
    initializer_range: float = 0.02

    @classmethod
    def from_hf_dict(cls, raw):
        return _build(cls, raw, **_rope_fields(raw, 10_000.0))

    def to_hf_dict(self):
        out = _to_dict(self)
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": out.pop("rope_theta")}
        return out


@dataclasses.dataclass(frozen=True)
class TalkerConfig:
    """Talker = MoE decoder + code predictor + projections (`Qwen3OmniMoeTalkerConfig`)."""

    text_config: TalkerTextConfig = dataclasses.field(default_factory=TalkerTextConfig)
    code_predictor_config: CodePredictorConfig = dataclasses.field(default_factory=CodePredictorConfig)
    num_code_groups: int = 32
    thinker_hidden_size: int = 2048
    codec_eos_token_id: int = 4198
    accept_hidden_layer: int = 18
    codec_nothink_id: int = 4203
    codec_think_bos_id: int = 4204
    codec_think_eos_id: int = 4205
    codec_pad_id: int = 4196
    codec_bos_id: int = 4197
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    position_id_per_seconds: int = 25
    audio_start_token_id: int = 151669
    spatial_merge_size: int = 2
    speaker_id: tuple[tuple[str, int], ...] = ()
    initializer_range: float = 0.02

    @classmethod
    def from_hf_dict(cls, raw):
        raw = dict(raw or {})
        return _build(
            cls,
            {k: v for k, v in raw.items() if not k.endswith("_config")},
            text_config=TalkerTextConfig.from_hf_dict(raw.get("text_config") or {}),
            code_predictor_config=CodePredictorConfig.from_hf_dict(raw.get("code_predictor_config") or {}),
        )

    def to_hf_dict(self):
        out = _to_dict(self)
        out["speaker_id"] = dict(self.speaker_id)
        return out


@dataclasses.dataclass(frozen=True)
class Code2WavConfig:
    """The Code2Wav vocoder (`Qwen3OmniMoeCode2WavConfig`)."""

    codebook_size: int = 2048
    hidden_size: int = 1024
    max_position_embeddings: int = 8000
    rope_theta: float = 10_000.0
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    attention_bias: bool = False
    sliding_window: int = 72
    intermediate_size: int = 3072
    hidden_act: str = "silu"
    layer_scale_initial_scale: float = 0.01
    rms_norm_eps: float = 1e-5
    num_hidden_layers: int = 8
    num_quantizers: int = 16
    upsample_rates: tuple[int, ...] = (8, 5, 4, 3)
    upsampling_ratios: tuple[int, ...] = (2, 2)
    decoder_dim: int = 1536
    initializer_range: float = 0.02

    @classmethod
    def from_hf_dict(cls, raw):
        return _build(cls, raw, **_rope_fields(raw or {}, 10_000.0))

    def to_hf_dict(self):
        out = _to_dict(self)
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": out.pop("rope_theta")}
        return out


@dataclasses.dataclass(frozen=True)
class OmniConfig:
    """The whole model (`Qwen3OmniMoeConfig`). `talker`/`code2wav` exist iff audio output is enabled."""

    thinker_config: ThinkerConfig = dataclasses.field(default_factory=ThinkerConfig)
    talker_config: TalkerConfig | None = None
    code2wav_config: Code2WavConfig | None = None
    enable_audio_output: bool = True
    im_start_token_id: int = 151644
    im_end_token_id: int = 151645
    tts_pad_token_id: int = 151671
    tts_bos_token_id: int = 151672
    tts_eos_token_id: int = 151673
    system_token_id: int = 8948
    user_token_id: int = 872
    assistant_token_id: int = 77091

    @property
    def text(self) -> ThinkerTextConfig:
        return self.thinker_config.text_config

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> "OmniConfig":
        raw = dict(raw)
        model_type = raw.get("model_type", "qwen3_omni_moe")
        if model_type not in ("qwen3_omni_moe", "qwen3_omni_moe_thinker"):
            raise ConfigError(
                f"config.json has model_type={model_type!r}; omni_jax reads 'qwen3_omni_moe' checkpoints"
            )
        if model_type == "qwen3_omni_moe_thinker":
            raw = {"thinker_config": raw, "enable_audio_output": False}
        enable_audio = bool(raw.get("enable_audio_output", True))
        return _build(
            cls,
            {k: v for k, v in raw.items() if not k.endswith("_config")},
            thinker_config=ThinkerConfig.from_hf_dict(raw.get("thinker_config") or {}),
            talker_config=TalkerConfig.from_hf_dict(raw.get("talker_config") or {}) if enable_audio else None,
            code2wav_config=Code2WavConfig.from_hf_dict(raw.get("code2wav_config") or {}) if enable_audio else None,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        out["model_type"] = "qwen3_omni_moe"
        out["architectures"] = ["Qwen3OmniMoeForConditionalGeneration"]
        for key in ("talker_config", "code2wav_config"):
            if out[key] is None:
                out.pop(key)
        return out

    def replace(self, **kwargs) -> "OmniConfig":
        return dataclasses.replace(self, **kwargs)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How to run a model, as opposed to what the model is.

    dtype: activation/compute dtype ("float32" for parity, "bfloat16" default).
    param_dtype: dtype parameters are stored in.
    scan_layers: `lax.scan` over stacked decoder layers (fast compiles) or a Python loop (unrolled).
    attention_impl: "auto" (Pallas kernel on GPU/TPU, XLA elsewhere; on CPU, a decode step of one
      float32 token per row runs each layer's attention block as `cpu_kernels.decode_attention`),
      "xla" (always XLA's ops) or "pallas".
    moe_impl: "grouped" (sort tokens by expert + grouped matmul) or "dense" (every expert on every
      token; the test oracle).
    grouped_matmul_impl: "auto" (Pallas on GPU/TPU, the pure-JAX tiled loop on CPU, and on CPU for
      decode-sized float32 batches the `cpu_kernels` expert kernel), "tiled", "ragged_dot" or "pallas".
    remat: rematerialisation policy name for training ("none", "full", "dots").
    expert_parallel: "auto" (inside a multi-device ambient mesh, `jax.set_mesh`, the MoE runs in
      `shard_map`: tokens stay on their shard and, when the mesh's `expert` axis is > 1, travel to the
      shard owning their expert by all-to-all; see `nn/expert_parallel.py`) or "none" (let XLA
      partition the single-device program).
    expert_capacity_factor: None (dropless) or c > 0: each shard sends at most
      ceil(c * tokens * top_k / num_experts) of its tokens to any one expert; the rest are dropped
      (they contribute nothing from that expert; the residual carries them), as in GShard.
    """

    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"
    scan_layers: bool = True
    attention_impl: str = "auto"
    moe_impl: str = "grouped"
    grouped_matmul_impl: str = "auto"
    remat: str = "none"
    expert_parallel: str = "auto"
    expert_capacity_factor: float | None = None

    def __post_init__(self):
        choices = {
            "attention_impl": ("auto", "xla", "pallas", "pallas_interpret"),
            "moe_impl": ("grouped", "dense"),
            "grouped_matmul_impl": ("auto", "tiled", "ragged_dot", "pallas", "pallas_interpret"),
            "remat": ("none", "full", "dots"),
            "expert_parallel": ("auto", "none"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"Runtime.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.expert_capacity_factor is not None and not self.expert_capacity_factor > 0:
            raise ConfigError(f"Runtime.expert_capacity_factor={self.expert_capacity_factor!r}; expected None "
                              "(dropless) or a number > 0")

    def replace(self, **kwargs) -> "Runtime":
        return dataclasses.replace(self, **kwargs)


def _qwen3_omni_30b_a3b() -> OmniConfig:
    """The published Qwen3-Omni-30B-A3B-Instruct checkpoint's values."""
    text = ThinkerTextConfig(
        vocab_size=152064, hidden_size=2048, intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=65536,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, mrope_section=(24, 20, 20),
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    )
    audio = AudioEncoderConfig(output_dim=2048)
    vision = VisionEncoderConfig(out_hidden_size=2048)
    thinker = ThinkerConfig(
        text_config=text, audio_config=audio, vision_config=vision, position_id_per_seconds=13,
        audio_token_id=151675, audio_start_token_id=151669, audio_end_token_id=151670,
    )
    talker = TalkerConfig(
        text_config=TalkerTextConfig(
            vocab_size=3072, hidden_size=1024, intermediate_size=2048, num_hidden_layers=20,
            num_attention_heads=16, num_key_value_heads=2, head_dim=128, max_position_embeddings=65536,
            rope_theta=1_000_000.0, mrope_section=(24, 20, 20), moe_intermediate_size=384,
            num_experts=128, num_experts_per_tok=6, norm_topk_prob=True, shared_expert_intermediate_size=768,
        ),
        code_predictor_config=CodePredictorConfig(rope_theta=1_000_000.0, num_code_groups=16),
        num_code_groups=16, thinker_hidden_size=2048, accept_hidden_layer=24,
        codec_pad_id=2148, codec_bos_id=2149, codec_eos_token_id=2150, codec_nothink_id=2155,
        codec_think_bos_id=2156, codec_think_eos_id=2157, audio_token_id=151675,
        position_id_per_seconds=13, audio_start_token_id=151669,
        speaker_id=(("aiden", 2303), ("chelsie", 2301), ("ethan", 2302)),
    )
    return OmniConfig(thinker_config=thinker, talker_config=talker, code2wav_config=Code2WavConfig())


def _tiny() -> OmniConfig:
    """A few-MB configuration with every component, for tests and the embedded default.

    Token ids are remapped into a 512-entry vocabulary; head_dim 16 gives 8 rotary slots split
    (4, 2, 2) so that T, H and W all get interleaved slots.
    """
    text = ThinkerTextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rope_theta=1_000_000.0,
        mrope_section=(4, 2, 2), moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
    )
    audio = AudioEncoderConfig(
        num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
        output_dim=64, downsample_hidden_size=16, n_window=50, n_window_infer=800,
    )
    vision = VisionEncoderConfig(
        depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
        num_position_embeddings=64, deepstack_visual_indexes=(0, 1, 2),
    )
    thinker = ThinkerConfig(
        text_config=text, audio_config=audio, vision_config=vision, position_id_per_seconds=13,
        audio_token_id=500, image_token_id=501, video_token_id=502, audio_start_token_id=503,
        audio_end_token_id=504, vision_start_token_id=505, vision_end_token_id=506, user_token_id=507,
    )
    talker = TalkerConfig(
        text_config=TalkerTextConfig(
            # 32 codec ids + 1024 special ids, the published layout (2048 + 1024): the reference's default
            # suppression of [vocab - 1024, vocab) leaves the codebook free, and greedy codes vary (with 96
            # ids the tiny talker's greedy codes saturated and hid a batching difference, see talker.start).
            vocab_size=1056, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=1_000_000.0, mrope_section=(4, 2, 2),
            moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
            shared_expert_intermediate_size=24,
        ),
        code_predictor_config=CodePredictorConfig(
            vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=1_000_000.0, num_code_groups=4,
        ),
        num_code_groups=4, thinker_hidden_size=64, accept_hidden_layer=2, codec_pad_id=80, codec_bos_id=81,
        codec_eos_token_id=82, codec_nothink_id=83, codec_think_bos_id=84, codec_think_eos_id=85,
        audio_token_id=500, image_token_id=501, video_token_id=502, vision_start_token_id=505,
        position_id_per_seconds=13, audio_start_token_id=503,
        speaker_id=(("aiden", 88), ("chelsie", 86), ("ethan", 87)),
    )
    code2wav = Code2WavConfig(
        codebook_size=32, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
        num_hidden_layers=2, num_quantizers=4, decoder_dim=64,
    )
    return OmniConfig(
        thinker_config=thinker, talker_config=talker, code2wav_config=code2wav,
        im_start_token_id=508, im_end_token_id=509, tts_pad_token_id=510, tts_bos_token_id=511,
        tts_eos_token_id=499, system_token_id=498, user_token_id=507, assistant_token_id=497,
    )


PRESETS = {
    "qwen3-omni-30b-a3b-instruct": _qwen3_omni_30b_a3b,
    "qwen3-omni-30b-a3b-thinking": lambda: _qwen3_omni_30b_a3b().replace(
        talker_config=None, code2wav_config=None, enable_audio_output=False),
    "qwen3-omni-30b-a3b-captioner": lambda: _qwen3_omni_30b_a3b().replace(
        talker_config=None, code2wav_config=None, enable_audio_output=False),
    "tiny": _tiny,
}


def preset(name: str) -> OmniConfig:
    """Returns a named preset; raises with the list of valid names for an unknown one."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None


def load_config(path: str | os.PathLike) -> OmniConfig:
    """Reads `config.json` from a checkpoint folder (or the file itself)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json at {path}: pass a Hugging Face or omni_jax checkpoint folder")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return OmniConfig.from_hf_dict(raw)
