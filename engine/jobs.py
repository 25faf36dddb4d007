"""Job specs: everything `starcast run` takes, as a TOML file loaded into a dataclass.

A spec has one table, `[run]`, whose keys are the arguments of `starcast.run` (`input`, `out`,
`model`, `samples`, `seed`, `backend`, `batch_size`, `ray`, `resume`, `progress`). Unknown keys are an
error that names the key, so a typo never silently falls back to a default. Relative paths are taken
relative to the spec file, so a spec can travel with its data.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import StarcastError

BACKENDS = ("auto", "triton", "cpu", "reference")


@dataclass(frozen=True)
class JobSpec:
    """The arguments of one run (see `starcast.run` for their meaning)."""

    input: str
    out: str
    model: str | None = None
    samples: int | None = None
    seed: int = 0
    backend: str = "auto"
    batch_size: int = 4096
    ray: str | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise StarcastError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.batch_size < 1:
            raise StarcastError(f"batch_size must be a positive number of spectra, got {self.batch_size}")
        if self.samples is not None and self.samples < 1:
            raise StarcastError(f"samples must be at least 1, got {self.samples}")

    def to_toml(self) -> str:
        """The spec as TOML text that `load_job` reads back into an equal spec (None keys omitted)."""
        lines = ["[run]"]
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def replace(self, **overrides) -> JobSpec:
        """A copy with the given fields replaced; `None` overrides are ignored (option not given)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


def load_job(path: str | os.PathLike, **overrides) -> JobSpec:
    """Read a TOML job spec; `overrides` (e.g. command-line options, `None` = not given) win."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise StarcastError(f"job spec {path}: cannot be read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise StarcastError(f"job spec {path}: not valid TOML ({exc})") from exc
    extra = sorted(set(doc) - {"run"})
    if extra:
        raise StarcastError(f"job spec {path}: unknown table {extra[0]!r} (expected only [run])")
    table = doc.get("run", {})
    known = {f.name for f in fields(JobSpec)}
    for key in table:
        if key not in known:
            raise StarcastError(f"job spec {path}: unknown key {key!r} in [run] "
                                f"(known keys: {', '.join(sorted(known))})")
    values = {**table, **{k: v for k, v in overrides.items() if v is not None}}
    for key in ("input", "out"):
        if key not in values:
            raise StarcastError(f"job spec {path}: [run] needs {key!r} (or give it on the command line)")
    for key in ("input", "out", "model"):
        from_spec = overrides.get(key) is None and isinstance(table.get(key), str)
        if from_spec and (key != "model" or _looks_like_path(table[key])):
            values[key] = _relative_to(path.parent, table[key])
    for f in fields(JobSpec):
        if f.name in table and not _has_type(table[f.name], _TYPES[f.name]):
            raise StarcastError(f"job spec {path}: [run] {f.name} = {table[f.name]!r} should be "
                                f"{_TYPES[f.name].__name__}")
    try:
        return JobSpec(**values)
    except StarcastError as exc:
        raise StarcastError(f"job spec {path}: {exc}") from None


_TYPES = {"input": str, "out": str, "model": str, "samples": int, "seed": int, "backend": str,
          "batch_size": int, "ray": str, "resume": bool, "progress": bool}


def _has_type(value, kind: type) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text


def _relative_to(base: Path, text: str) -> str:
    return text if os.path.isabs(text) else os.path.normpath(base / text)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
