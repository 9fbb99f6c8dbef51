"""omni_jax checkpoints on disk: `config.json` (the Hugging Face serialisation) + orbax parameters.

Layout of a converted checkpoint folder:

    config.json        the model config, as transformers writes it (so tools can read it)
    omni_jax.json      {"format": 1, "dtype": ..., "components": [...]}; marks an omni_jax checkpoint
    params/            orbax PyTree checkpoint of the parameter tree
    tokenizer.json, chat_template.json, ...   copied from the source when present
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import orbax.checkpoint as ocp

from omni_jax.config import OmniConfig

__all__ = ["is_omni_jax_checkpoint", "save_params", "restore_params", "TOKENIZER_FILES"]

FORMAT_VERSION = 1
MARKER = "omni_jax.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "chat_template.json", "chat_template.jinja",
    "special_tokens_map.json", "generation_config.json", "preprocessor_config.json",
)


def is_omni_jax_checkpoint(path: str) -> bool:
    return os.path.exists(os.path.join(path, MARKER))


def save_params(path: str, params: dict, config: OmniConfig, dtype: str, *, copy_from: str | None = None) -> None:
    """Writes `params` and `config` to folder `path` (created; an existing `params/` is an error)."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    target = os.path.join(path, "params")
    if os.path.exists(target):
        raise FileExistsError(f"{target} exists; choose an empty --dst folder or remove it")
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(target, params)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"format": FORMAT_VERSION, "dtype": dtype, "components": sorted(params)}, f, indent=2)
    if copy_from:
        for name in TOKENIZER_FILES:
            src = os.path.join(copy_from, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(path, name))


def restore_params(path: str, abstract_params: dict) -> dict:
    """Restores the parameter tree into the shapes/dtypes/shardings of `abstract_params`."""
    path = os.path.abspath(path)  # orbax refuses relative paths
    with open(os.path.join(path, MARKER)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has omni_jax checkpoint format {meta.get('format')}; expected {FORMAT_VERSION}")
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract_params
    )
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(
            os.path.join(path, "params"), args=ocp.args.PyTreeRestore(item=abstract_params, restore_args=restore_args)
        )
