"""The job spec: the JSON form of a separation request shared by OSC jobs, hot-folder job files and the journal.

    {"mix": "song.wav", "query": ["solo.wav"], "query_ranges": [[12.5, 16.0]], "out_dir": "stems",
     "engine": "nmf", "format": "wav", "bit_depth": 32, "refine": false, "steps": 10}

Validation turns anything malformed into a `SpecError` that names the key and what it should be.
"""
from __future__ import annotations

from pathlib import Path

from stemquery.daw_bridge.jobs import SeparationRequest, range_problem
from stemquery.daw_bridge.paths import PathPolicy
from stemquery.model.api import DEFAULT_ENGINE
from stemquery.model.audio import OutputFormat
from stemquery.model.engines import engine_class
from stemquery.model.errors import StemqueryError

MAX_QUERIES = 16


class SpecError(StemqueryError):
    code = "bad_request"


def _number(spec: dict, key: str, kind):
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise SpecError(f"{key} must be a number, got {value!r}") from None
        else:
            raise SpecError(f"{key} must be a number, got {type(value).__name__}")
    if kind is int:
        if value != int(value):
            raise SpecError(f"{key} must be a whole number, got {value}")
        return int(value)
    return float(value)


def _flag(value) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off", ""):
            return False
        raise SpecError(f"refine must be true or false, got {value!r}")
    return bool(value)


def _window(value, key: str) -> list[float] | None:
    if value is None:
        return None
    try:
        start, length = (float(v) for v in value)
    except (TypeError, ValueError):
        raise SpecError(f"{key} must be [start, length] in seconds") from None
    if start < 0 or length <= 0:
        raise SpecError(f"{key} {value}: start must be ≥ 0 and length > 0")
    return [start, length]


def _as_spec_error(check, *args):
    """A request's own mistake (unknown engine, FLAC at 32 bits) is a bad_request, whatever code `check` uses."""
    try:
        return check(*args)
    except StemqueryError as exc:
        raise SpecError(str(exc)) from None


def validate_spec(raw: dict) -> dict:
    """Check types and values (not paths); return a normalised copy."""
    if not isinstance(raw, dict):
        raise SpecError("a job must be a JSON object")
    known = {"mix", "query", "query_ranges", "out_dir", "engine", "format", "bit_depth", "refine", "steps",
             "mix_window", "query_windows"}
    unknown = set(raw) - known
    if unknown:
        raise SpecError(f"unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    if not isinstance(raw.get("mix"), str) or not raw["mix"]:
        raise SpecError("mix must be the path of the mix file")
    queries = raw.get("query", [])
    if isinstance(queries, str):
        queries = [q for q in queries.split("|") if q]
    if not isinstance(queries, list) or not all(isinstance(q, str) and q for q in queries):
        raise SpecError("query must be a path, several paths separated by '|', or a list of paths")
    if len(queries) > MAX_QUERIES:
        raise SpecError(f"at most {MAX_QUERIES} query files per job")
    ranges = raw.get("query_ranges", [])
    try:
        ranges = [(float(a), float(b)) for a, b in ranges]
    except (TypeError, ValueError):
        raise SpecError("query_ranges must be a list of [start, end] seconds") from None
    for start, end in ranges:
        if problem := range_problem(start, end):
            raise SpecError(problem)
    mix_window = _window(raw.get("mix_window"), "mix_window")
    query_windows = raw.get("query_windows") or [None] * len(queries)
    if not isinstance(query_windows, list) or len(query_windows) != len(queries):
        raise SpecError("query_windows must be a list with one [start, length] (or null) per query")
    query_windows = [_window(w, "query_windows") for w in query_windows]
    if not queries and not ranges:
        raise SpecError("give a query file or a query range (query_start/query_end) of the mix")
    spec = {"mix": raw["mix"], "query": queries, "query_ranges": [list(r) for r in ranges],
            "out_dir": raw.get("out_dir") or None, "engine": raw.get("engine") or None,
            "format": str(raw.get("format") or "wav").lower(), "refine": _flag(raw.get("refine", False)),
            "mix_window": mix_window, "query_windows": query_windows}
    spec["bit_depth"] = _number(raw, "bit_depth", int) if raw.get("bit_depth") is not None else None
    spec["steps"] = _number(raw, "steps", int) if raw.get("steps") is not None else None
    if spec["out_dir"] is not None and not isinstance(spec["out_dir"], str):
        raise SpecError("out_dir must be a folder path")
    if spec["engine"] is not None:
        if not isinstance(spec["engine"], str):
            raise SpecError("engine must be an engine name")
        _as_spec_error(engine_class, spec["engine"])  # unknown engine → clear error now, not when the job runs
    _as_spec_error(OutputFormat, spec["format"], spec["bit_depth"] or (32 if spec["format"] == "wav" else 24))
    if spec["steps"] is not None and not 1 <= spec["steps"] <= 100:
        raise SpecError(f"steps must be between 1 and 100, got {spec['steps']}")
    if spec["steps"] is not None and not spec["refine"]:
        raise SpecError("steps only applies with refine 1")
    if spec["refine"] and spec["engine"] is not None:
        # An early answer when the engine is named; with the server's default engine, the job itself says why.
        reason = engine_class(spec["engine"]).refine_unavailable_reason()
        if reason:
            raise SpecError(f"refine: {reason}")
    return spec


def resolve_spec_paths(spec: dict, policy: PathPolicy, *, base: Path | None, default_out: Path | None) -> dict:
    """Every path in the spec resolved and checked against the policy; inputs must exist as files."""
    resolved = dict(spec)
    resolved["mix"] = str(policy.resolve(spec["mix"], base=base))
    resolved["query"] = [str(policy.resolve(q, base=base)) for q in spec["query"]]
    out = spec.get("out_dir")
    if out is None and default_out is None:
        raise SpecError("out_dir is required: the folder the stems are written to")
    resolved["out_dir"] = str(policy.resolve(out, base=base) if out else default_out)
    return resolved


def request_from_spec(spec: dict, *, default_engine: str = DEFAULT_ENGINE) -> SeparationRequest:
    return SeparationRequest(
        mix=Path(spec["mix"]),
        queries=[Path(q) for q in spec["query"]],
        query_ranges=[tuple(r) for r in spec["query_ranges"]],
        out_dir=Path(spec["out_dir"]),
        engine=spec.get("engine") or default_engine,
        container=spec["format"],
        bit_depth=spec.get("bit_depth"),
        mix_window=tuple(spec["mix_window"]) if spec.get("mix_window") else None,
        query_windows=[tuple(w) if w else None for w in spec.get("query_windows") or []],
        refine=bool(spec.get("refine")),
        steps=spec.get("steps"),
    )
