"""Config keys ("knobs"): a dataclass field with its type, range and whether ``--resume`` may
change it, and the one check of a value against them. Used by every section that declares
keys - the config's own ([run], [optim], ...), each strategy's options and each policy
factory's ``options`` - so those import this module, not the config that gathers them.

A value is checked where it enters (TOML, ``--set``, flags, ``compare`` specs) and the error
names the key: ``optim.lr: expected a number >= 0.0, got -0.1``.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import field, fields
from typing import Any


def knob(default, *, ge=None, gt=None, le=None, choices=None, resumable: bool = False,
         pattern: str | None = None, what: str | None = None):
    """A config key: its default, its range (``ge``/``gt``/``le``, ``choices``, a regex
    ``pattern`` for strings, described by ``what``) and whether ``--resume`` may change it."""
    return field(default=default, metadata=dict(ge=ge, gt=gt, le=le, choices=choices,
                                                resumable=resumable, pattern=pattern, what=what))


def _describe(kind, meta) -> str:
    if meta.get("what"):
        return meta["what"]
    if meta.get("choices"):
        return f"one of {tuple(meta['choices'])}"
    base = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}[kind]
    bounds = [f">= {meta['ge']}" if meta.get("ge") is not None else None,
              f"> {meta['gt']}" if meta.get("gt") is not None else None,
              f"<= {meta['le']}" if meta.get("le") is not None else None]
    return " ".join([base, " and ".join(b for b in bounds if b)]).strip()


def check_value(key: str, kind: type, meta: dict, value: Any) -> Any:
    """The value coerced to ``kind`` (strings from the CLI parse) and range-checked; a
    ValueError ``key: expected ..., got ...`` otherwise."""
    def bad():
        extra = ""
        if meta.get("choices") and isinstance(value, str):
            close = difflib.get_close_matches(value, meta["choices"], n=1)
            extra = f" (did you mean {close[0]!r}?)" if close else ""
        return ValueError(f"{key}: expected {_describe(kind, meta)}, got {value!r}{extra}")

    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind in (int, float):
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value = float(value.strip()) if kind is float else int(value.strip())
            except ValueError:
                raise bad() from None
        if not isinstance(value, (int, float)) or value != value or value in (float("inf"), -float("inf")):
            raise bad()
        if kind is int:
            if value != int(value):
                raise bad()
            value = int(value)
        else:
            value = float(value)
        if ((meta.get("ge") is not None and value < meta["ge"]) or
                (meta.get("gt") is not None and value <= meta["gt"]) or
                (meta.get("le") is not None and value > meta["le"]) or
                (meta.get("choices") and value not in meta["choices"])):
            raise bad()
        return value
    if not isinstance(value, str):
        raise bad()
    if meta.get("choices") and value not in meta["choices"]:
        raise bad()
    if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
        raise bad()
    return str(value)  # a plain str (command-line text comes as a str subclass)


def kind_of(f) -> type:
    return {"int": int, "float": float, "bool": bool, "str": str}[f.type if isinstance(f.type, str)
                                                                   else f.type.__name__]


def section_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls)}


__all__ = ["knob", "check_value", "kind_of", "section_fields"]
