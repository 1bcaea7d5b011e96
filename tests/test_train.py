"""Training: a few real steps on a small synthetic corpus, checkpoint, resume, export, use."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from conftest import tone_sequence
from stemquery.model import Separator
from stemquery.model.bsmamba import BSMambaConfig
from stemquery.model.evaluate import build_evalset
from stemquery.model.train import TrainConfig, Trainer, export

RATE = 44100


def make_corpus(root: Path) -> Path:
    """Three tracks in the renderer's layout, each with three differently-timbred synthetic stems."""
    rng = np.random.default_rng(0)
    for index in range(3):
        folder = root / f"t{index:06d}"
        (folder / "stems").mkdir(parents=True)
        stems = []
        for position, (low, high, timbre, program) in enumerate([(40, 52, "saw", 33), (60, 72, "hollow", 73),
                                                                  (52, 64, "saw", 0)]):
            audio = tone_sequence(rng.integers(low, high, 12), 0.5, harmonics=timbre)
            name = f"stems/{position:02d}_part{position}.flac"
            sf.write(folder / name, np.stack([audio, audio * 0.9]).T, RATE, subtype="PCM_16")
            stems.append({"file": name, "part": f"part{position}", "program": program, "family": "synthetic",
                          "is_drum": False, "timbre": "synthetic.sf2", "notes": []})
        (folder / "meta.json").write_text(json.dumps({"track": folder.name, "stems": stems}))
    return root


def test_train_checkpoint_resume_export(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    build_evalset(corpus, tmp_path / "val", cases=2, seed=0, segment_s=2.0, query_s=1.0, protocols=("same_stem",))
    config = TrainConfig(run_dir=tmp_path / "run", train_corpus=corpus, val_set=tmp_path / "val", batch=2,
                         segment_s=1.0, query_s=1.0, max_steps=3, validate_every=2, val_cases=2, log_every=1,
                         warmup_steps=2, model=BSMambaConfig(dim=16, layers=1, bands=8, d_state=8, headdim=16,
                                                              query_dim=16, chunk=16))
    trainer = Trainer(config)
    trainer.run()
    assert trainer.step == 3 and (tmp_path / "run" / "last.pt").exists()
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    resumed = Trainer(dataclasses.replace(config, max_steps=5))
    resumed.resume(tmp_path / "run" / "last.pt")
    assert resumed.step == 3 and resumed.curve == trainer.curve and resumed.curve[0]["step"] == 2
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    resumed.run()
    assert resumed.step == 5
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    assert [r["validation"]["step"] for r in log if "validation" in r] == [2, 4]

    export(tmp_path / "run" / "last.pt", tmp_path / "weights" / "model")
    meta = json.loads((tmp_path / "weights" / "model.json").read_text())
    assert meta["step"] == 5 and meta["config"]["dim"] == 16
    mix, _ = sf.read(corpus / "t000000" / "stems" / "00_part0.flac", dtype="float32")
    stems = Separator("bsmamba", device="cpu", weights=tmp_path / "weights" / "model").separate(
        mix.T, RATE, [mix.T[:, :RATE]])
    assert stems.target.shape == mix.T.shape
