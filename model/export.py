"""Ship a training checkpoint as weights: safetensors + a config JSON with its training provenance.

    stemquery train export runs/bsmamba/last.pt --out model/weights/bsmamba-v3
"""
from __future__ import annotations

from pathlib import Path

import torch

from stemquery.model.bsmamba import BSMamba, BSMambaConfig


def _export_separator(state: dict, out: Path, provenance: dict) -> None:
    from stemquery.model.engines.bsmamba import save_weights

    model = BSMamba(BSMambaConfig(**state["config"]["model"]))
    model.load_state_dict(state["model"])
    save_weights(model, out, extra=provenance)


def _export_refiner(state: dict, out: Path, provenance: dict) -> None:
    from stemquery.model.refiner import save_refiner
    from stemquery.model.train_refiner import refiner_from_state

    save_refiner(refiner_from_state(state), out, extra=provenance)


def _export_vae(state: dict, out: Path, provenance: dict) -> None:
    from stemquery.model.vae import TimbrePitchVAE, VAEConfig, save_vae

    vae = TimbrePitchVAE(VAEConfig.from_dict(state["config"]["model"]))
    vae.load_state_dict(state["model"])
    save_vae(vae, out, extra=provenance)


EXPORTERS = {"separator": _export_separator, "refiner": _export_refiner, "vae": _export_vae}


def export(checkpoint: Path, out: Path) -> None:
    """Write a checkpoint's model as shipped weights (safetensors + config JSON with its training provenance)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    kind = state.get("kind", "separator")
    if kind not in EXPORTERS:
        raise ValueError(f"{checkpoint}: a {kind} checkpoint cannot be exported; export a separator, refiner or "
                         "VAE checkpoint")
    curve = state["curve"]
    EXPORTERS[kind](state, out, {"kind": kind, "step": state["step"], "validation": curve[-1] if curve else None,
                                 "curve": curve, "best": state.get("best"), "train_config": state["config"]})
