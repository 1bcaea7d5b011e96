"""Eval sets and the `stemquery eval` harness: SNR, SI-SDR and SDR per case, beside honest baselines.

Eval set format (docs/data.md): SET/case_NNN/{mixture, query, target}.flac + meta.json.
Every report carries, beside the engines asked for: `mix` (the unprocessed mixture: 0 dB improvement by
definition), `nmf` (the classical baseline) and `irm` (the ideal ratio mask with the engines' STFT: the ceiling
of a mask model).
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
import torch

from stemquery.model.errors import StemqueryError
from stemquery.model.stft import STFT

log = logging.getLogger(__name__)

METRICS = ("snr", "si_sdr", "sdr")
BASELINES = ("mix", "nmf", "irm")
EPS = 1e-9
SDR_CLAMP_DB = 100.0


# -- metrics: (channels, samples) arrays, channels joined end to end (a hard-panned source may leave one
# channel silent, where a per-channel ratio is undefined) ---------------------------------------------------------
def _flat(audio: np.ndarray) -> np.ndarray:
    return np.asarray(audio, np.float64).reshape(-1)


def snr(estimate: np.ndarray, reference: np.ndarray) -> float:
    estimate, reference = _flat(estimate), _flat(reference)
    return float(10 * np.log10((np.sum(reference**2) + EPS) / (np.sum((estimate - reference) ** 2) + EPS)))


def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    estimate, reference = _flat(estimate), _flat(reference)
    projection = (estimate @ reference) / (reference @ reference + EPS) * reference
    return float(10 * np.log10((np.sum(projection**2) + EPS) / (np.sum((estimate - projection) ** 2) + EPS)))


def sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """BSS Eval SDR (distortion filter of 512 taps) via fast_bss_eval, in torch float32."""
    import fast_bss_eval

    ref = torch.from_numpy(_flat(reference).astype(np.float32))[None]
    est = torch.from_numpy(_flat(estimate).astype(np.float32))[None]
    value = fast_bss_eval.bss_eval_sources(ref, est, compute_permutation=False, clamp_db=SDR_CLAMP_DB,
                                           load_diag=1e-6)[0]
    # An estimate the distortion filter explains exactly (a near-binary oracle mask) gives inf: clamp it.
    return float(np.clip(float(value), -SDR_CLAMP_DB, SDR_CLAMP_DB))


METRIC_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"snr": snr, "si_sdr": si_sdr, "sdr": sdr}


def irm_oracle(mixture: np.ndarray, target: np.ndarray, stft: STFT = STFT(2048, 512)) -> np.ndarray:
    """Ideal (power) ratio mask from the true sources, applied to the mixture's STFT."""
    mix_t, target_t = torch.from_numpy(mixture), torch.from_numpy(target)
    spec_mix, spec_target, spec_rest = stft.forward(mix_t), stft.forward(target_t), stft.forward(mix_t - target_t)
    mask = spec_target.abs() ** 2 / (spec_target.abs() ** 2 + spec_rest.abs() ** 2 + EPS)
    return stft.inverse(spec_mix * mask, mixture.shape[-1]).numpy()


# -- eval sets -------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    mixture: np.ndarray
    query: np.ndarray
    target: np.ndarray
    sample_rate: int
    meta: dict


def read_case(folder: Path) -> Case:
    def load(name: str) -> tuple[np.ndarray, int]:
        audio, rate = sf.read(folder / f"{name}.flac", dtype="float32", always_2d=True)
        return np.ascontiguousarray(audio.T), rate

    mixture, rate = load("mixture")
    return Case(folder.name, mixture, load("query")[0], load("target")[0], rate,
                json.loads((folder / "meta.json").read_text()))


def case_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith("case_") and (p / "meta.json").exists())


def build_evalset(corpus: Path, out: Path, *, cases: int, seed: int, sample_rate: int = 44100,
                  segment_s: float = 10.0, query_s: float = 4.0, protocols=None) -> int:
    """Draw `cases` cases from a rendered corpus, protocols in turn; returns how many were written."""
    from stemquery.model.data.dataset import PROTOCOLS, TripleSampler, load_corpus

    protocols = tuple(protocols or PROTOCOLS)
    sampler = TripleSampler(load_corpus(corpus, sample_rate), sample_rate=sample_rate, segment_s=segment_s,
                            query_s=query_s, protocols=protocols, absent_target_p=0.0, random_gains=False)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for index in range(cases):
        protocol = protocols[index % len(protocols)]
        triple = sampler.draw(rng, protocol)
        folder = out / f"case_{index:03d}"
        folder.mkdir(exist_ok=True)
        for name in ("mixture", "query", "target"):
            sf.write(folder / f"{name}.flac", getattr(triple, name).T, sample_rate, subtype="PCM_24")
        (folder / "meta.json").write_text(json.dumps({"protocol": protocol, "sample_rate": sample_rate,
                                                     "corpus": str(corpus), **triple.info}, indent=1))
    return cases


# -- the harness -----------------------------------------------------------------------------------------------
def score(estimate: np.ndarray, case: Case) -> dict[str, float]:
    values = {m: METRIC_FUNCTIONS[m](estimate, case.target) for m in METRICS}
    for m in METRICS:
        values[f"{m}_i"] = values[m] - METRIC_FUNCTIONS[m](case.mixture, case.target)
    return values


def _number(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_engine_spec(text: str) -> tuple[str, dict]:
    """`NAME` or `NAME:key=value,key=value` (e.g. `bsmamba:refine=1,steps=5,blend=0.5`) → (name, Separator
    options); values that read as numbers become int or float."""
    name, _, options = text.partition(":")
    parsed = {}
    for item in filter(None, options.split(",")):
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise StemqueryError(f"engine {text!r}: options are key=value pairs separated by commas, "
                                 "e.g. bsmamba:refine=1,steps=5")
        parsed[key] = _number(value)
    if "refine" in parsed:
        parsed["refine"] = bool(parsed["refine"])
    return name, parsed


def engine_fingerprint(separator) -> str:
    """What an engine's results depend on besides the case: how it runs (its label) and its configuration or
    weights (the refiner's too)."""
    import hashlib

    engine = separator.engine
    files = [getattr(engine, attribute, None) for attribute in ("weights_path", "refiner_path")]
    if any(files):
        identity = ":".join(hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files if f)
    else:
        identity = repr(getattr(engine, "config", ""))
    return hashlib.sha256(f"{engine.label}:{identity}".encode()).hexdigest()[:16]


def _file_name(engine_spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", engine_spec)


#: What the engines are given as the query: the case's query clip, its clean target itself (the perfect example: an
#: engine that matches its query gains from it, one that only recognises the instrument does not), or the name of
#: the case's instrument (its bundled example clips: `model/instruments.py`).
QUERY_SOURCES = ("clip", "target", "name")
#: Baselines that take only a clip of this very sound (NMF learns its bases from it; a name gives it none): with
#: `query_from="name"` they keep the case's clip, as the reference beside the named queries.
CLIP_ONLY = ("nmf",)


def case_instrument(case: Case) -> str:
    """The instrument name a musician would ask for the case's target by (its GM program's, or its family's)."""
    from stemquery.model.instruments import name_for_program

    return name_for_program(int(case.meta.get("program", 0)), case.meta.get("family") == "drums")


def _query_source(name: str, query_from: str) -> str:
    return "clip" if query_from == "name" and name in CLIP_ONLY else query_from


#: The option `stemquery eval` takes itself rather than the engine: on a refining engine, `oracle=KIND` scores the
#: separator's estimate corrected towards the target instead of by the refiner (`model.refiner.ORACLES`: the
#: refiner's bounds, e.g. `bsmamba:refine=1,oracle=latent` beside `bsmamba:refine=1`).
ORACLE_OPTION = "oracle"


def _engine_options(name: str) -> tuple[str, dict, str | None]:
    """An engine spec → (engine, Separator options, oracle kind or None)."""
    from stemquery.model.refiner import ORACLES

    engine, options = parse_engine_spec(name)
    oracle = options.pop(ORACLE_OPTION, None)
    if oracle is not None and (oracle not in ORACLES or not options.get("refine")):
        raise StemqueryError(f"engine {name!r}: oracle= takes one of {', '.join(ORACLES)}, on an engine with "
                             "refine=1 (e.g. bsmamba:refine=1,oracle=latent)")
    return engine, options, oracle


def _oracle_estimate(separator, case: Case, query: np.ndarray, kind: str) -> np.ndarray:
    if case.mixture.shape[1] > separator.engine.segment_seconds * case.sample_rate:
        raise StemqueryError(f"{case.name}: an oracle refinement takes cases of one segment "
                             f"({separator.engine.segment_seconds:g} s) at most")
    if case.sample_rate != separator.engine.sample_rate:
        raise StemqueryError(f"{case.name}: an oracle refinement needs the engine's sample rate "
                             f"({separator.engine.sample_rate} Hz), not {case.sample_rate}")
    mixture, query_clip, target = (torch.from_numpy(audio) for audio in (case.mixture, query, case.target))
    return separator.engine.oracle_refinement(mixture, [query_clip], target, kind).numpy()


def _estimate(name: str, case: Case, separators: dict, query_from: str = "clip",
              oracle: str | None = None) -> np.ndarray:
    if name == "mix":
        return case.mixture
    if name == "irm":
        return irm_oracle(case.mixture, case.target)
    if oracle is not None:
        return _oracle_estimate(separators[name], case, case.target if query_from == "target" else case.query,
                                oracle)
    if query_from == "name":
        from stemquery.model.api import StemQuery

        instrument = case_instrument(case)
        return separators[name].separate_stems(case.mixture, case.sample_rate, {instrument: StemQuery()})[instrument]
    query = case.target if query_from == "target" else case.query
    return separators[name].separate(case.mixture, case.sample_rate, [query]).target


def evaluate(root: Path, engines: list[str], *, device: str = "cpu", limit: int | None = None,
             progress: Callable[[int, int], None] | None = None, cache: Path | None = None,
             query_from: str = "clip") -> dict:
    """Run every engine (and the baselines) on every case; return per-case rows and summaries. `query_from`:
    one of `QUERY_SOURCES`.

    With `cache`, each engine's per-case rows and times are kept in CACHE/<engine>-<fingerprint>.json and reused
    for the same engine configuration or weights (a re-evaluation after training then scores only the new model).
    """
    from stemquery.model.api import Separator

    names = list(dict.fromkeys([*BASELINES, *engines]))
    separators, oracles = {}, {}
    for name in names:
        if name not in ("mix", "irm"):
            engine, options, oracles[name] = _engine_options(name)
            if oracles[name] and query_from == "name":
                raise StemqueryError(f"engine {name!r}: an oracle refinement takes a clip query, not a name")
            separators[name] = Separator(engine, device=device, **options)
    if query_from not in QUERY_SOURCES:
        raise StemqueryError(f"query_from must be one of {', '.join(QUERY_SOURCES)}, not {query_from!r}")
    fingerprints = {n: engine_fingerprint(separators[n]) if n in separators else "v1" for n in names}
    fingerprints = {n: f"{f}-oracle-{oracles[n]}" if oracles.get(n) else f for n, f in fingerprints.items()}
    fingerprints = {n: f if _query_source(n, query_from) == "clip" else f"{f}-{query_from}"
                    for n, f in fingerprints.items()}
    stored: dict[str, dict] = {}
    if cache:
        for name in names:
            path = cache / f"{_file_name(name)}-{fingerprints[name]}.json"
            stored[name] = json.loads(path.read_text()) if path.exists() else {}
    folders = case_folders(root)[:limit]
    rows, seconds, audio_seconds = [], {n: 0.0 for n in names}, 0.0
    for index, folder in enumerate(folders):
        case = read_case(folder)
        audio_seconds += case.mixture.shape[1] / case.sample_rate
        for name in names:
            if case.name in stored.get(name, {}):
                row, took = stored[name][case.name]
            else:
                started = time.perf_counter()
                estimate = _estimate(name, case, separators, _query_source(name, query_from), oracles.get(name))
                took = time.perf_counter() - started
                row = {"case": case.name, "engine": name, "protocol": case.meta.get("protocol", ""),
                       "family": case.meta.get("family", ""), **score(estimate, case)}
                if _query_source(name, query_from) == "name":
                    row["query"] = case_instrument(case)
                stored.setdefault(name, {})[case.name] = (row, took)
            seconds[name] += took
            rows.append(row)
        if progress:
            progress(index + 1, len(folders))
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        for name in names:
            (cache / f"{_file_name(name)}-{fingerprints[name]}.json").write_text(json.dumps(stored[name]))
    rtf = {n: (seconds[n] / audio_seconds if audio_seconds else 0.0) for n in names}
    return {"set": str(root), "cases": len(folders), "engines": names, "rtf": rtf, "rows": rows, "query_from": query_from,
            "fingerprints": fingerprints, "summary": summarise(rows, names)}


def summarise(rows: list[dict], engines: list[str]) -> dict:
    def stats(selected: list[dict]) -> dict:
        out = {"n": len(selected)}
        for m in METRICS:
            for key in (m, f"{m}_i"):
                values = np.array([r[key] for r in selected])
                out[f"{key}_mean"] = float(values.mean()) if len(values) else float("nan")
                out[f"{key}_median"] = float(np.median(values)) if len(values) else float("nan")
        return out

    summary: dict = {"overall": {}, "protocol": {}, "family": {}}
    for engine in engines:
        mine = [r for r in rows if r["engine"] == engine]
        summary["overall"][engine] = stats(mine)
        for group in ("protocol", "family"):
            for value in sorted({r[group] for r in mine}):
                summary[group].setdefault(value, {})[engine] = stats([r for r in mine if r[group] == value])
    return summary


def markdown_report(result: dict) -> str:
    engines = result["engines"]
    query = {"target": " Queries: each case's clean target (the perfect example).",
             "name": " Queries: the name of each case's instrument (its bundled example clips); "
                     f"{', '.join(CLIP_ONLY)}: the case's clip (a name gives it nothing to learn bases from)."}.get(
        result.get("query_from"), "")
    lines = [f"Eval set `{result['set']}`: {result['cases']} cases.{query} Improvements (…i) are over the unprocessed "
             "mix; means (medians in brackets), dB.", "",
             "| engine | SNR | SNRi | SI-SDRi | SDRi | SI-SDR | RTF |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for engine in engines:
        s = result["summary"]["overall"][engine]
        lines.append(f"| {engine} | {s['snr_mean']:.2f} | {s['snr_i_mean']:.2f} ({s['snr_i_median']:.2f}) | "
                     f"{s['si_sdr_i_mean']:.2f} ({s['si_sdr_i_median']:.2f}) | "
                     f"{s['sdr_i_mean']:.2f} ({s['sdr_i_median']:.2f}) | {s['si_sdr_mean']:.2f} | "
                     f"{result['rtf'][engine]:.3f} |")
    for group in ("protocol", "family"):
        lines += ["", f"SI-SDR improvement by {group} (mean, dB; n cases):", "",
                  f"| {group} | n | " + " | ".join(engines) + " |", "| --- | --- | " + " | ".join("---" for _ in engines) + " |"]
        for value, per_engine in result["summary"][group].items():
            n = next(iter(per_engine.values()))["n"]
            lines.append(f"| {value} | {n} | " + " | ".join(f"{per_engine[e]['si_sdr_i_mean']:.2f}" for e in engines) + " |")
    return "\n".join(lines) + "\n"
