"""`bsmamba`: the trained query-conditioned band-split Mamba, as an engine of the Separator API."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from stemquery.model.bsmamba import BSMamba, BSMambaConfig
from stemquery.model.engines.base import Engine, StepProgress, no_progress, register_engine
from stemquery.model.errors import StemqueryError
from stemquery.model.stft import STFT

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
WEIGHTS_NAME = "bsmamba-v1"


def weights_paths(name: str = WEIGHTS_NAME, folder: Path | None = None) -> tuple[Path, Path]:
    folder = folder or WEIGHTS_DIR
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def save_weights(model: BSMamba, path: Path, extra: dict | None = None) -> None:
    """Weights as safetensors + the config (and provenance) as JSON beside them."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps({"config": model.config.to_dict(), **(extra or {})}, indent=1))


#: Scan chunk length for inference (training uses 32; the weights do not depend on it).
INFERENCE_CHUNK = 64


def load_model(path: Path, device: torch.device | str = "cpu") -> BSMamba:
    from safetensors.torch import load_file

    meta = json.loads(path.with_suffix(".json").read_text())
    model = BSMamba(BSMambaConfig.from_dict({**meta["config"], "chunk": INFERENCE_CHUNK}))
    model.load_state_dict(load_file(str(path.with_suffix(".safetensors"))), strict=True)
    return model.to(device).eval()


@register_engine
class BSMambaEngine(Engine):
    name = "bsmamba"
    description = "query-conditioned band-split Mamba-2 network (trained here)"
    segment_seconds = 8.0
    overlap = 0.125

    def __init__(self, *, device: torch.device, weights: str | Path | None = None) -> None:
        super().__init__(device=device)
        path = Path(weights) if weights else weights_paths()[0]
        if not path.with_suffix(".safetensors").exists() or not path.with_suffix(".json").exists():
            raise StemqueryError(f"engine bsmamba: weights {path.with_suffix('.safetensors')} (and its .json) "
                                 "not found; train them with `stemquery train separator` or use --engine nmf")
        self.weights_path = path.with_suffix(".safetensors")
        self.model = load_model(path, device)
        self.stft = STFT(self.model.config.n_fft, self.model.config.hop)
        self.sample_rate = self.model.config.sample_rate

    @classmethod
    def unavailable_reason(cls) -> str | None:
        weights, config = weights_paths()
        if not weights.exists() or not config.exists():
            return f"no trained weights shipped yet ({weights.name})"
        return None

    def _stereo_spec(self, audio: torch.Tensor) -> torch.Tensor:
        audio = audio.to(self.device, torch.float32)
        if audio.shape[0] == 1:
            audio = audio.expand(2, -1)
        return self.stft.forward(audio)[None]

    def encode_query(self, clips: list[torch.Tensor], progress: StepProgress = no_progress) -> torch.Tensor:
        embedding = self.model.embed_queries([self._stereo_spec(clip) for clip in clips])
        progress(1.0)
        return embedding

    def separate_segment(self, mix: torch.Tensor, query: torch.Tensor,
                         progress: StepProgress = no_progress) -> torch.Tensor:
        target = self.stft.inverse(self.model(self._stereo_spec(mix), query)[0], mix.shape[-1])
        progress(1.0)
        return target.mean(dim=0, keepdim=True) if mix.shape[0] == 1 else target
