"""How well each query embedding tells instruments apart, on an eval set's queries (leave-one-out nearest neighbour).

    python benchmarks/query_embeddings.py data/eval_test [--separator model/weights/bsmamba-v6]
                                          [--refiner model/weights/refiner-v3]

Per case, three embeddings of its query clip: the separator's (what its FiLM layers are conditioned on), the
refiner VAE's pooled timbre, and both joined (each standardised over the set first). The figure is the share of
queries whose nearest other query (cosine) is the same instrument (GM program or drums, and SoundFont) or the same
family, counted over the queries that have such a neighbour in the set at all.

This is the issue's "does the VAE timbre help the separator's query encoder" asked of the embeddings rather than of a
retrained separator: if the VAE's timbre does not tell the set's instruments apart better than the separator's own
embedding, and joining them adds nothing, feeding it to the encoder brings the separator no information it lacks.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stemquery.model.engines.bsmamba import REFINER_NAME, WEIGHTS_DIR, WEIGHTS_NAME, load_model  # noqa: E402
from stemquery.model.evaluate import case_folders, read_case  # noqa: E402
from stemquery.model.refiner import load_refiner  # noqa: E402
from stemquery.model.stft import STFT  # noqa: E402


def instrument(meta: dict) -> tuple:
    return ("drums" if meta["family"] == "drums" else meta["program"], meta["timbre"])


def nearest_neighbour_accuracy(embeddings: np.ndarray, labels: list) -> tuple[float, int]:
    """Share of rows whose most similar other row has the same label, over rows whose label occurs twice or more."""
    unit = embeddings / (np.linalg.norm(embeddings, axis=1, keepdims=True) + 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(axis=1)
    counted = [i for i, label in enumerate(labels) if labels.count(label) > 1]
    hits = sum(labels[nearest[i]] == labels[i] for i in counted)
    return hits / max(len(counted), 1), len(counted)


def standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_set", type=Path)
    parser.add_argument("--separator", type=Path, default=WEIGHTS_DIR / WEIGHTS_NAME)
    parser.add_argument("--refiner", type=Path, default=WEIGHTS_DIR / REFINER_NAME)
    args = parser.parse_args()

    separator, refiner = load_model(args.separator), load_refiner(args.refiner)
    stft = STFT(separator.config.n_fft, separator.config.hop)
    separator_rows, vae_rows, metas = [], [], []
    with torch.no_grad():
        for folder in case_folders(args.eval_set):
            case = read_case(folder)
            query = torch.from_numpy(case.query)
            spec = stft.forward(query.expand(2, -1) if query.shape[0] == 1 else query)[None]
            separator_rows.append(separator.embed_queries([spec]).embedding[0].numpy())
            vae_rows.append(refiner.vae.timbre_embedding(spec)[0].numpy())
            metas.append(case.meta)
    separator_embeddings, vae_embeddings = np.stack(separator_rows), np.stack(vae_rows)
    joined = np.concatenate([standardise(separator_embeddings), standardise(vae_embeddings)], axis=1)
    print(f"{args.eval_set}: {len(metas)} queries; nearest-neighbour accuracy (queries counted)")
    print("| embedding | dims | same instrument | same family |")
    print("| --- | --- | --- | --- |")
    for name, embeddings in (("separator query encoder", separator_embeddings), ("VAE timbre", vae_embeddings),
                             ("both joined", joined)):
        by_instrument, n_instrument = nearest_neighbour_accuracy(embeddings, [instrument(m) for m in metas])
        by_family, n_family = nearest_neighbour_accuracy(embeddings, [m["family"] for m in metas])
        print(f"| {name} | {embeddings.shape[1]} | {by_instrument:.3f} ({n_instrument}) | {by_family:.3f} ({n_family}) |")


if __name__ == "__main__":
    main()
