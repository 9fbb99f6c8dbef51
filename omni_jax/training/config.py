"""`TrainConfig`: everything a training run needs, from YAML plus `key=value` command-line overrides.

    cfg = TrainConfig.load("configs/thinker.yaml", ["optim.lr=1e-4", "mesh.data=8"])

Sections (each a frozen dataclass; unknown keys are errors that list the valid ones):

    model      which weights: a preset name or a checkpoint folder, the init seed of presets
    runtime    `omni_jax.config.Runtime`: compute dtype (`dtype`), parameter/master-weight dtype
               (`param_dtype`: "float32" = fp32 master weights with `dtype` compute, "bfloat16" =
               pure bf16), rematerialisation (`remat`), attention / MoE implementations
    data       `omni_jax.training.data.DataConfig` (manifest, batch size, sequence buckets, ...)
    mesh       `omni_jax.sharding.MeshConfig` (data, expert, tensor, fsdp, dcn_data)
    optim      AdamW, warm-up + cosine schedule, clipping, gradient accumulation
    loss       coefficients: MoE load balancing (default: the thinker config's router_aux_loss_coef),
               talker and code-predictor cross-entropies
    checkpoint directory, save_every, keep, async saves, export of the final parameters
    log        directory, every, JSONL / TensorBoard switches, peak FLOP/s per device for the MFU estimate
    synthetic  the embedded synthetic task: generated into `directory` if absent, used as the data

Top-level keys: stage ("encoder_alignment" | "thinker" | "talker" | "custom"), train_patterns /
freeze_patterns (regexes searched in '/'-joined parameter paths), seed, max_steps.

Overrides are dotted paths (`optim.lr=3e-4`, `data.batch_size=8`, `freeze_patterns=[lm_head]`);
values are parsed as YAML and converted to the field's type (`1e-4` is a float for a float field).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from typing import Any, Mapping, Sequence

import yaml

from omni_jax.config import ConfigError, Runtime
from omni_jax.sharding import MeshConfig

try:  # worker-owned module; the config stays importable (and says why) without it
    from omni_jax.training.data import DataConfig
except ImportError as _e:  # pragma: no cover - only while the data module is missing
    DataConfig = None  # type: ignore[assignment,misc]
    _DATA_IMPORT_ERROR: Exception | None = _e
else:
    _DATA_IMPORT_ERROR = None

__all__ = [
    "ModelConfig", "OptimConfig", "LossConfig", "CheckpointConfig", "LogConfig", "SyntheticConfig", "TrainConfig",
    "STAGES",
    "stage_train_patterns", "parse_overrides", "ConfigError",
]

# Trainable parameters of each stage preset (regexes searched in '/'-joined paths of the model's
# parameter tree). Code2Wav is never trained: no loss reaches it.
STAGES: dict[str, tuple[str, ...]] = {
    # The encoders learn to speak the frozen LLM's language (audio tower and vision encoder with
    # their projections and DeepStack mergers).
    "encoder_alignment": (r"^thinker/(audio_tower|visual)/",),
    # The whole thinker: encoders, decoder, embeddings, lm_head.
    "thinker": (r"^thinker/",),
    # Talker decoder, its projections of thinker states, the code predictor; thinker frozen.
    "talker": (r"^talker/",),
    # Nothing by default: `train_patterns` says what.
    "custom": (),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """name: a preset (`omni_jax.config.PRESETS`, random init with `init_seed`) or a checkpoint folder
    (Hugging Face or omni_jax). skip_absent_components: a Hugging Face checkpoint's keys of components
    the configuration leaves out are dropped instead of refused."""

    name: str = "tiny"
    init_seed: int = 0
    skip_absent_components: bool = False

    @property
    def is_checkpoint(self) -> bool:
        return os.path.isdir(self.name)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio`
    at `total_steps` (default: the run's max_steps). `grad_clip_norm` None disables clipping.
    grad_accum_steps: the data batch is split into this many micro-batches, run in one jitted step
    (a scan) whose statistics cover the whole batch (see `omni_jax.training.step`).
    no_decay_patterns: parameters exempt from weight decay besides every rank-1 parameter (norm
    scales, biases; the stacked `layers` axis does not count): by default the embedding tables."""

    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.1
    grad_clip_norm: float | None = 1.0
    grad_accum_steps: int = 1
    no_decay_patterns: tuple[str, ...] = (r"(embed_tokens|codec_embedding|code_embedding|pos_embed)/",)

    def __post_init__(self):
        if self.lr < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("optim.lr, optim.weight_decay and optim.warmup_steps must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"optim.grad_accum_steps={self.grad_accum_steps} must be >= 1")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError("optim.grad_clip_norm must be > 0 (or null to disable clipping)")
        _check_patterns("optim.no_decay_patterns", self.no_decay_patterns)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """aux_loss_coef: MoE load-balancing coefficient (None: the thinker text config's
    router_aux_loss_coef, 0.001 for the published model). aux_loss_scope: "global" computes the
    expert-load statistics over the whole global batch, all micro-batches together (exact, costs an
    extra forward per micro-batch when grad_accum_steps > 1); "micro_batch" uses each micro-batch's own.
    talker_loss_coef / code_predictor_loss_coef weight the speech cross-entropies (talker stage).
    talker_aux_loss_coef: the talker's own MoE load-balancing coefficient (None: the talker text config's
    router_aux_loss_coef), computed per micro-batch over the talker sequence as the reference talker's
    `aux_loss`."""

    aux_loss_coef: float | None = None
    aux_loss_scope: str = "global"
    talker_loss_coef: float = 1.0
    code_predictor_loss_coef: float = 1.0
    talker_aux_loss_coef: float | None = None

    def __post_init__(self):
        if self.aux_loss_scope not in ("global", "micro_batch"):
            raise ConfigError(f"loss.aux_loss_scope={self.aux_loss_scope!r}; expected 'global' or 'micro_batch'")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """directory None: no checkpoints (and no resume). Every `save_every` steps, keeping `keep`.
    export_dir: where the final parameters are written as an omni_jax checkpoint that `infer.py
    --ckpt` reads (default: `<directory>/export`, or none without a directory)."""

    directory: str | None = None
    save_every: int = 1000
    keep: int = 3
    async_save: bool = True
    export_dir: str | None = None
    export_dtype: str = "float32"

    def __post_init__(self):
        if self.save_every < 1 or self.keep < 1:
            raise ConfigError("checkpoint.save_every and checkpoint.keep must be >= 1")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """directory: where `metrics.jsonl` and TensorBoard events go (default: the checkpoint directory,
    else no files). every: log each N steps. peak_flops_per_device: for the MFU estimate (default:
    looked up from the device kind, none on CPU)."""

    directory: str | None = None
    every: int = 1
    jsonl: bool = True
    tensorboard: bool = True
    progress_bar: bool = True
    peak_flops_per_device: float | None = None

    def __post_init__(self):
        if self.every < 1:
            raise ConfigError("log.every must be >= 1")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The embedded synthetic task (`omni_jax.training.synthetic`): with `directory` set, train.py
    generates it there when `<directory>/train.jsonl` does not exist yet, and `data.manifest` /
    `data.tokenizer` default to its manifest and text assets."""

    directory: str | None = None
    num_train: int = 2000
    num_eval: int = 100
    seed: int = 0
    speech_targets: bool = True


def _default_runtime() -> Runtime:
    return Runtime(dtype="bfloat16", param_dtype="float32")


def _default_data():
    if DataConfig is None:
        return None
    try:
        return DataConfig()
    except TypeError:  # required fields (the manifest): the YAML must give them
        return None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole run. See the module docstring for the sections."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    runtime: Runtime = dataclasses.field(default_factory=_default_runtime)
    data: Any = dataclasses.field(default_factory=_default_data)  # DataConfig
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    stage: str = "thinker"
    train_patterns: tuple[str, ...] | None = None
    freeze_patterns: tuple[str, ...] = ()
    seed: int = 0
    max_steps: int = 1000

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r}; expected one of {', '.join(STAGES)}")
        if self.stage == "custom" and not self.train_patterns:
            raise ConfigError("stage='custom' needs train_patterns (regexes of the parameters to train)")
        if self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps} must be >= 1")
        _check_patterns("train_patterns", self.train_patterns or ())
        _check_patterns("freeze_patterns", self.freeze_patterns)

    # ------------------------------------------------------------------------------------- derived
    @property
    def total_steps(self) -> int:
        return self.optim.total_steps or self.max_steps

    @property
    def effective_train_patterns(self) -> tuple[str, ...]:
        return tuple(self.train_patterns) if self.train_patterns is not None else STAGES[self.stage]

    def is_trainable(self, path: str) -> bool:
        """Whether the parameter at '/'-joined `path` is trained: it matches a train pattern (the
        stage's by default) and no freeze pattern."""
        return any(re.search(p, path) for p in self.effective_train_patterns) and not any(
            re.search(p, path) for p in self.freeze_patterns
        )

    def aux_loss_coef(self, model_config) -> float:
        if self.loss.aux_loss_coef is not None:
            return float(self.loss.aux_loss_coef)
        return float(model_config.thinker_config.text_config.router_aux_loss_coef)

    def talker_aux_loss_coef(self, model_config) -> float:
        if self.loss.talker_aux_loss_coef is not None:
            return float(self.loss.talker_aux_loss_coef)
        if model_config.talker_config is None:
            return 0.0
        return float(model_config.talker_config.text_config.router_aux_loss_coef)

    # ------------------------------------------------------------------------------------- I/O
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "TrainConfig":
        return _from_dict(cls, dict(raw or {}), "config")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> "TrainConfig":
        """YAML file (or None: all defaults) + `key=value` overrides."""
        raw: dict = {}
        if path is not None:
            path = os.fspath(path)
            if not os.path.exists(path):
                raise FileNotFoundError(f"config file {path!r} does not exist")
            with open(path) as f:
                try:
                    raw = yaml.safe_load(f) or {}
                except yaml.YAMLError as e:
                    raise ConfigError(f"{path} is not valid YAML: {e}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
            raw = _resolve_paths(raw, os.path.dirname(os.path.abspath(path)))
        return cls.from_dict(parse_overrides(raw, overrides, cls))

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-serialisable dict (round-trips through `from_dict`)."""
        return _to_plain(self)

    def replace(self, **kwargs) -> "TrainConfig":
        return dataclasses.replace(self, **kwargs)


# ----------------------------------------------------------------------------------------- helpers
def stage_train_patterns(stage: str) -> tuple[str, ...]:
    return STAGES[stage]


def _check_patterns(name: str, patterns) -> None:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ConfigError(f"{name}: {p!r} is not a valid regular expression ({e})") from None


# Config-relative paths: a YAML's `data.manifest` and friends are taken relative to the YAML file
# when they do not exist relative to the working directory.
_PATH_KEYS = {("data", "manifest"), ("data", "tokenizer"), ("model", "name")}
# Output folders in a YAML are relative to the working directory (where the user runs train.py).


def _resolve_paths(raw: dict, base: str) -> dict:
    out = dict(raw)
    for section, key in _PATH_KEYS:
        sec = out.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str):
            value = sec[key]
            if not os.path.isabs(value) and not os.path.exists(value) and os.path.exists(os.path.join(base, value)):
                out[section] = dict(sec, **{key: os.path.join(base, value)})
    return out


class _RawText(str):
    """An override's value as typed: converted by the target field's type (str fields keep the text)."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    types_ = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
    if cls is TrainConfig and DataConfig is not None:
        types_["data"] = DataConfig
    return types_


def _valid_keys(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _section_class(tp):
    """The dataclass inside `tp` (X, X | None), or None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def parse_overrides(raw: dict, overrides: Sequence[str], cls=None) -> dict:
    """Applies `a.b.c=value` overrides to a nested dict; keys are checked against the dataclasses."""
    cls = TrainConfig if cls is None else cls
    out = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node, node_cls, where = out, cls, "config"
        for i, part in enumerate(parts):
            if node_cls is None:
                raise ConfigError(f"override {key!r}: {where} is not a section")
            types_ = _field_types(node_cls)
            if part not in types_:
                raise ConfigError(f"override {key!r}: unknown key {part!r} in {where}; valid keys: "
                                  f"{_valid_keys(node_cls)}")
            if node_cls is TrainConfig and part == "data" and DataConfig is None:
                raise ConfigError(f"the data section needs omni_jax.training.data ({_DATA_IMPORT_ERROR})")
            where = f"{where}.{part}" if where != "config" else part
            if i == len(parts) - 1:
                node[part] = _RawText(value.strip())
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {} if child is None else _plain_section(child)
                    node[part] = child
                node, node_cls = child, _section_class(types_[part])
    return out


def _plain_section(value):
    if dataclasses.is_dataclass(value):
        return _to_plain(value)
    raise ConfigError(f"cannot override inside a non-section value {value!r}")


def _deep_copy(x):
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x


def _section_default(field: dataclasses.Field):
    """A section field's default instance (its default_factory may differ from the class defaults:
    the training runtime keeps fp32 master weights)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    if field.default is not dataclasses.MISSING:
        return field.default
    return None


def _from_dict(cls, raw: Mapping[str, Any], where: str, base=None):
    """`cls` from a mapping; keys it leaves out come from `base` (an instance) or the class defaults."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {_valid_keys(cls)}, got {raw!r}")
    types_ = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in types_]
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(repr(k) for k in unknown)} in {where}; valid keys: "
                          f"{_valid_keys(cls)}")
    kwargs = {}
    for name, value in raw.items():
        sub = f"{where}.{name}" if where != "config" else name
        if cls is TrainConfig and name == "data" and DataConfig is None:
            raise ConfigError(f"the data section needs omni_jax.training.data ({_DATA_IMPORT_ERROR})")
        section = _section_class(types_[name])
        default = _section_default(fields[name]) if section is not None else None
        kwargs[name] = _coerce(types_[name], value, sub, default if isinstance(default, section or ()) else None)
    if base is not None:
        kwargs = {**{f: getattr(base, f) for f in fields}, **kwargs}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(tp, value, where: str, base=None):
    """`value` (from YAML, or an override's raw text) converted to the field type `tp`; a section's
    missing keys come from `base`."""
    if tp is Any:
        return yaml.safe_load(value) if isinstance(value, _RawText) else value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if isinstance(value, _RawText) and value.lower() in ("null", "none", "~") and type(None) in args:
            return None
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where} must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, base)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, _RawText):
            value = yaml.safe_load(value)
        return _from_dict(tp, value or {}, where, base)
    if origin is tuple:
        if isinstance(value, _RawText):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if isinstance(value, _RawText):
        return yaml.safe_load(value)
    return value


def _to_plain(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    return x
