"""Training: config (`TrainConfig`), losses, the thinker training forward, optimizer, the jitted
train step, metrics; data, checkpoints and the synthetic task live in `data`, `checkpointing`,
`synthetic`, and the speech losses in `speech_losses`. `python train.py --config configs/NAME.yaml`.

Names are imported lazily so that `import omni_jax.training.data` does not pull in the rest.
"""

from __future__ import annotations

import importlib

__all__ = ["TrainConfig", "TrainState", "TrainStep", "make_train_step"]

_LAZY = {
    "TrainConfig": "omni_jax.training.config",
    "TrainState": "omni_jax.training.step",
    "TrainStep": "omni_jax.training.step",
    "make_train_step": "omni_jax.training.step",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'omni_jax.training' has no attribute {name!r}")
