"""Engines register themselves on import; importing this package makes every engine known by name."""
from stemquery.model.engines import bsmamba, nmf  # noqa: F401
from stemquery.model.engines.base import Engine, EngineInfo, engine_class, engine_infos, register_engine

__all__ = ["Engine", "EngineInfo", "engine_class", "engine_infos", "register_engine"]
