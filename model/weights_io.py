"""Shipped weights on disk: a module's tensors as `<path>.safetensors`, its config and provenance as `<path>.json`
beside them (paths without suffix). The separator, the refiner and the VAE are saved and loaded through these."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def save_module(module: torch.nn.Module, path: Path, meta: dict) -> None:
    """The module's state as safetensors and `meta` (its config, provenance) as JSON, beside each other."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def read_meta(path: Path) -> dict:
    """The JSON beside shipped weights."""
    return json.loads(Path(path).with_suffix(".json").read_text())


def load_state(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """The shipped tensors into `module` (strictly: every tensor must fit), which is returned."""
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(Path(path).with_suffix(".safetensors"))), strict=True)
    return module
