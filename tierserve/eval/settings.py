"""Engine-settings strings for ``--compare``: ``"kv_dtype=fp8,max_num_batched_tokens=32"`` -> kwargs.

Keys are EngineConfig field names (``kv-dtype`` is accepted for ``kv_dtype``); values are converted to the
field's type. An unknown key or a value of the wrong type is a ``ValueError`` that names the key.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from tierserve.config import EngineConfig

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("none", "null")


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(EngineConfig)}


def _convert(name: str, annotation: str, raw: str) -> Any:
    ann = str(annotation)
    optional = "None" in ann or "Optional" in ann
    low = raw.strip().lower()
    if optional and low in _NONE:
        return None
    if "bool" in ann:
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"engine setting {name} must be a bool (true/false), got {raw!r}")
    if "int" in ann and "float" not in ann:
        try:
            return int(raw, 0)
        except ValueError:
            raise ValueError(f"engine setting {name} must be an integer, got {raw!r}") from None
    if "float" in ann:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"engine setting {name} must be a number, got {raw!r}") from None
    return raw


def parse_settings(spec: str) -> dict[str, Any]:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}``; ``""`` (or ``"default"``) -> ``{}``."""
    spec = spec.strip()
    if spec in ("", "default", "dense", "baseline"):
        return {}
    fields = _fields()
    out: dict[str, Any] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"engine setting {part!r} in {spec!r} must look like name=value")
        key, raw = (s.strip() for s in part.split("=", 1))
        key = key.lstrip("-").replace("-", "_")
        if key not in fields or key == "model":
            known = ", ".join(sorted(n for n in fields if n != "model"))
            raise ValueError(f"unknown engine setting {key!r} in {spec!r}; known: {known}")
        out[key] = _convert(key, fields[key].type, raw)
    return out


def label(settings: dict[str, Any]) -> str:
    """The setting's name in rows and tables, with CLI spelling: ``kv-dtype=fp8,page-size=8``."""
    if not settings:
        return "default"
    return ",".join(f"{k.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in settings.items())


def validate(settings: dict[str, Any]) -> None:
    """Build an EngineConfig to get its range checks before any model is loaded."""
    EngineConfig.from_kwargs(**settings)
