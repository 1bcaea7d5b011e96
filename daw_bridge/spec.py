"""The job spec: the JSON form of a separation request shared by OSC jobs, hot-folder job files and the journal.

    {"mix": "song.wav", "query": ["solo.wav"], "query_ranges": [[12.5, 16.0]], "out_dir": "stems",
     "engine": "nmf", "format": "wav", "bit_depth": 32, "refine": false, "steps": 10,
     "stems": [{"name": "guitar", "query": ["lick.wav"]}, {"name": "bass"}, "keys=@3:6"]}

`query`/`query_ranges` are the one-stem shorthand (the stem `target`); `stems` asks for several, each from clips,
ranges of the mix, or (neither) the bundled examples of the instrument it is named after.

Validation turns anything malformed into a `SpecError` that names the key and what it should be.
"""
from __future__ import annotations

import re
from pathlib import Path

from stemquery.daw_bridge.jobs import SeparationRequest, StemRequest, range_problem
from stemquery.daw_bridge.paths import PathPolicy
from stemquery.model.api import DEFAULT_ENGINE
from stemquery.model.audio import OutputFormat
from stemquery.model.engines import engine_class
from stemquery.model.instruments import lookup
from stemquery.model.errors import StemqueryError

MAX_QUERIES = 16
MAX_STEMS = 16
#: A stem's name goes into its file name (`<mix>_(NAME)_<engine>.wav`): words, spaces, `+ . -`, no path parts.
STEM_NAME = re.compile(r"\w[\w .+-]{0,63}")


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


def _queries(raw: dict, where: str) -> tuple[list[str], list[tuple[float, float]], list[list[float] | None]]:
    """A request's (or a stem's) query files, query ranges and query windows, checked."""
    queries = raw.get("query", [])
    if isinstance(queries, str):
        queries = [q for q in queries.split("|") if q]
    if not isinstance(queries, list) or not all(isinstance(q, str) and q for q in queries):
        raise SpecError(f"{where}query must be a path, several paths separated by '|', or a list of paths")
    if len(queries) > MAX_QUERIES:
        raise SpecError(f"at most {MAX_QUERIES} query files per job")
    try:
        ranges = [(float(a), float(b)) for a, b in raw.get("query_ranges", [])]
    except (TypeError, ValueError):
        raise SpecError(f"{where}query_ranges must be a list of [start, end] seconds") from None
    for start, end in ranges:
        if problem := range_problem(start, end):
            raise SpecError(where + problem)
    windows = raw.get("query_windows") or [None] * len(queries)
    if not isinstance(windows, list) or len(windows) != len(queries):
        raise SpecError(f"{where}query_windows must be a list with one [start, length] (or null) per query")
    return queries, ranges, [_window(w, f"{where}query_windows") for w in windows]


def parse_stem_text(text: str) -> dict:
    """`NAME` (the bundled examples of that instrument), `NAME=CLIP[|CLIP2...]` or `NAME=@START:END` (a range of
    the mix; ranges and clips may be mixed with `|`) → a stem spec."""
    name, equals, queries = text.partition("=")
    stem: dict = {"name": name.strip(), "query": [], "query_ranges": []}
    for part in filter(None, queries.split("|")):
        if part.startswith("@"):
            try:
                start, end = (float(x) for x in part[1:].split(":"))
            except ValueError:
                raise SpecError(f"stem {text!r}: {part!r} is not @START:END in seconds, e.g. @12.5:16") from None
            stem["query_ranges"].append([start, end])
        else:
            stem["query"].append(part)
    if equals and not queries:
        raise SpecError(f"stem {text!r}: give a clip after '=' (NAME=CLIP), or the name alone for the bundled "
                        "examples of that instrument")
    return stem


def named_query_files(raw: dict) -> list:
    """Every query file a raw (unchecked) job names, its stems' too, each once; whatever does not parse is left out
    (the job's validation says what is wrong with it)."""
    def files(queries) -> list:
        return queries if isinstance(queries, list) else str(queries or "").split("|")

    names = files(raw.get("query"))
    for stem in raw.get("stems") or [] if isinstance(raw.get("stems"), list) else []:
        if isinstance(stem, str):
            names += stem.partition("=")[2].split("|")
        elif isinstance(stem, dict):
            names += files(stem.get("query"))
    return list(dict.fromkeys(n for n in names if isinstance(n, str)))  # a file two stems share moves once


def _stems(raw) -> list[dict]:
    """The `stems` list, each a `parse_stem_text` string or an object {name, query, query_windows, query_ranges};
    stems of the same name are joined (several examples of one sound)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SpecError("stems must be a list of stems: names, NAME=CLIP strings or {name, query, ...} objects")
    joined: dict[str, dict] = {}
    for item in raw:
        item = parse_stem_text(item) if isinstance(item, str) else item
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise SpecError("each stem needs a name: a string, or an object with a name")
        unknown = set(item) - {"name", "query", "query_windows", "query_ranges"}
        if unknown:
            raise SpecError(f"stem {item['name']!r}: unknown key(s) {', '.join(sorted(unknown))}")
        name = item["name"].strip()
        if not STEM_NAME.fullmatch(name) or name.lower() == "residual":
            raise SpecError(f"stem name {name!r}: use letters, digits, spaces and _ + . - (up to 64, no path "
                            "separators), and not 'residual' (that is everything else)")
        queries, ranges, windows = _queries(item, f"stem {name!r}: ")
        stem = joined.setdefault(name, {"name": name, "query": [], "query_windows": [], "query_ranges": []})
        stem["query"] += queries
        stem["query_windows"] += windows
        stem["query_ranges"] += [list(r) for r in ranges]
    if len(joined) > MAX_STEMS:
        raise SpecError(f"at most {MAX_STEMS} stems per job")
    for stem in joined.values():
        if not stem["query"] and not stem["query_ranges"]:
            lookup(stem["name"])  # an unknown instrument: its nearest names now (bad_query), not when the job runs
    return list(joined.values())


def validate_spec(raw: dict) -> dict:
    """Check types and values (not paths); return a normalised copy."""
    if not isinstance(raw, dict):
        raise SpecError("a job must be a JSON object")
    known = {"mix", "query", "query_ranges", "out_dir", "engine", "format", "bit_depth", "refine", "steps",
             "mix_window", "query_windows", "stems"}
    unknown = set(raw) - known
    if unknown:
        raise SpecError(f"unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    if not isinstance(raw.get("mix"), str) or not raw["mix"]:
        raise SpecError("mix must be the path of the mix file")
    queries, ranges, query_windows = _queries(raw, "")
    stems = _stems(raw.get("stems"))
    if sum(len(stem["query"]) for stem in stems) + len(queries) > MAX_QUERIES:
        raise SpecError(f"at most {MAX_QUERIES} query files per job")
    mix_window = _window(raw.get("mix_window"), "mix_window")
    if not queries and not ranges and not stems:
        raise SpecError("give a query file or a query range (query_start/query_end) of the mix, or stems")
    spec = {"mix": raw["mix"], "query": queries, "query_ranges": [list(r) for r in ranges],
            "out_dir": raw.get("out_dir") or None, "engine": raw.get("engine") or None,
            "format": str(raw.get("format") or "wav").lower(), "refine": _flag(raw.get("refine", False)),
            "mix_window": mix_window, "query_windows": query_windows, "stems": stems}
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
    resolved["stems"] = [{**stem, "query": [str(policy.resolve(q, base=base)) for q in stem["query"]]}
                         for stem in spec.get("stems") or []]
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
        stems=[_stem_request(stem) for stem in spec.get("stems") or []],
    )


def _stem_request(stem: dict) -> StemRequest:
    return StemRequest(stem["name"], [Path(q) for q in stem["query"]],
                       [tuple(w) if w else None for w in stem["query_windows"]],
                       [tuple(r) for r in stem["query_ranges"]])


def stem_requests(texts: list[str]) -> list[StemRequest]:
    """The CLI's `--stem` values (`parse_stem_text`), checked and joined by name."""
    return [_stem_request(stem) for stem in _stems(texts)]
