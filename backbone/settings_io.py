"""Config flow shared by every command (dinov2 style): dataclass defaults <- YAML file <- ``key=value`` overrides.

Unknown keys are errors, never silently ignored: a typo in a config must not train the wrong model.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from backbone.fileio import write_text

T = TypeVar("T")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "model_overrides.depth=4"]`` -> nested dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _parse_scalar(value)
    return out


def _parse_scalar(text: str) -> Any:
    """YAML scalar, except that ``1e-5`` is a float (YAML 1.1 would read it as a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``override`` wins."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_dataclass(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Instantiate ``cls`` from ``values``; unknown keys raise ValueError listing the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}; valid options: {sorted(names)}")
    return cls(**values)


def dump_yaml(obj: Any, path: str | os.PathLike) -> None:
    """Write a dataclass or dict as YAML atomically (the merged config saved next to every output)."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    text = yaml.safe_dump(data, sort_keys=False)
    write_text(path, text)
