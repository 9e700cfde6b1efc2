"""Config of the unlearn stage (kept free of heavy imports: experiment.py imports it)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ..config import from_dict
from ..errors import UndoError


@dataclasses.dataclass
class MethodRun:
    """One unlearning run: a method, its options and TrainConfig overrides."""

    method: str
    name: Optional[str] = None                                           # artifact name (default: method)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)    # the method's Options fields
    train: dict[str, Any] = dataclasses.field(default_factory=dict)      # TrainConfig fields over the method's defaults

    def validate(self, where: str) -> None:
        from ..training import TrainConfig
        from .base import resolve_options

        resolve_options(self.method, self.options)  # unknown method / option names raise here
        from_dict(TrainConfig, self.train, f"{where}.train")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise UndoError(f"{where}.name {self.name!r} is not a usable directory name; use letters, digits, - and _")


def _number(value: Any) -> Any:
    """YAML reads 1e-4 (no dot) as a string; a sweep value that looks like a number is one."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def _default_runs() -> list[MethodRun]:
    return [MethodRun("graddiff"), MethodRun("maxent"), MethodRun("rmu")]


@dataclasses.dataclass
class UnlearnConfig:
    methods: list[MethodRun] = dataclasses.field(default_factory=_default_runs)
    # A run qualifies as UNDO's teacher when its retain metric is within this fraction of the base model's.
    retain_tolerance: float = 0.1
    # Grid applied to every run: TrainConfig fields or method options -> values, e.g. {lr: [1e-4, 3e-4]}.
    sweep: dict[str, list[Any]] = dataclasses.field(default_factory=dict)

    def validate(self, where: str) -> None:
        if not 0 <= self.retain_tolerance:
            raise UndoError(f"{where}.retain_tolerance must be >= 0, got {self.retain_tolerance}")
        for key, values in self.sweep.items():
            if not isinstance(values, list) or not values:
                raise UndoError(f"{where}.sweep.{key}: give a non-empty list of values, e.g. [1.0e-4, 3.0e-4]")
            self.sweep[key] = [_number(v) for v in values]
        names = [run.name or run.method for run in self.methods]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UndoError(f"{where}.methods: two runs are named {', '.join(dupes)}; give each a distinct `name`")
