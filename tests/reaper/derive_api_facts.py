"""Derive tests/reaper/reaper_api_facts.json (name → parameter names) from REAPER's API description.

    python tests/reaper/derive_api_facts.py ../shared/reaper/reaper-api.lua

The source is a LuaCATS description of REAPER v7.40's ReaScript API; the facts file keeps only what the tests
need (which `reaper.*` functions exist and how many arguments each takes), so tests run without ../shared.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
FACTS = HERE / "reaper_api_facts.json"
#: The description lists these without their one function parameter (REAPER's docs: each takes one function).
ONE_FUNCTION = {"defer", "atexit", "runloop"}


def derive(api_text: str) -> dict[str, list[str]]:
    facts = {}
    for name, params in re.findall(r"^function reaper\.(\w+)\(([^)]*)\)", api_text, re.MULTILINE):
        facts[name] = [p.strip() for p in params.split(",") if p.strip()]
    for name in ONE_FUNCTION & set(facts):
        facts[name] = facts[name] or ["function"]
    return dict(sorted(facts.items()))


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "reaper" / "reaper-api.lua")
    facts = derive(source.read_text())
    FACTS.write_text(json.dumps({"source": "REAPER v7.40 ReaScript API (LuaCATS description)",
                                 "functions": facts}, indent=0) + "\n")
    print(f"{len(facts)} functions → {FACTS}")
