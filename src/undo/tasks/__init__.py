"""Task registry: name -> Task class. A task's options are validated by its `Options` dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import from_dict
from ..registry import Registry
from .base import Example, Task

_REGISTRY = Registry("task", "undo tasks", {
    # name -> "module:Class", imported lazily so a task's optional deps load only when used
    "arithmetic": "undo.tasks.arithmetic:ArithmeticTask",
    "language": "undo.tasks.language:LanguageTask",
    "wmdp": "undo.tasks.wmdp:WMDPTask",
    "privacy": "undo.tasks.privacy:PrivacyTask",
    "facts": "undo.tasks.facts:FactsTask",
    "toxicity": "undo.tasks.toxicity:ToxicityTask",
    "fair_classification": "undo.tasks.fair_classification:FairClassificationTask",
    "bias": "undo.tasks.bias:BiasTask",
})


@dataclasses.dataclass
class TaskConfig:
    name: str = "arithmetic"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self, where: str) -> None:
        task_class(self.name)
        from_dict(task_class(self.name).Options, self.options, f"{where}.options")


def known_tasks() -> list[str]:
    return list(_REGISTRY)


def register_task(name: str, target: "str | type[Task]") -> None:
    """Add a task from outside the package ("module:Class" or the class itself)."""
    _REGISTRY.register(name, target)


def task_class(name: str) -> type[Task]:
    return _REGISTRY.get_class(name)


def build_task(cfg: TaskConfig, seed: int) -> Task:
    cls = task_class(cfg.name)
    options = from_dict(cls.Options, cfg.options, "task.options")
    return cls(options, seed)


__all__ = ["Example", "Task", "TaskConfig", "build_task", "known_tasks", "register_task", "task_class"]
