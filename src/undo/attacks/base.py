"""The attack interface and registry.

An attack is a small class: a `name`, a one-line `description`, an `Options` dataclass,
`points()` (its independent runs, e.g. one per learning rate: each becomes a stage of its
own, cached by a key that covers only that run) and `run(...)`, which attacks one model
with one point and returns the sidecar: at least "curve", a list of {"step": k, **metrics}
(a one-shot attack: one entry at step 1; step 0 is the model before the attack), plus
"flops" and "wall_seconds". A point is any JSON mapping ({"lr": 1e-3}, {"bits": 4}, {}); the
store records it as is.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar, Optional

from ..config import from_dict
from ..registry import Registry

# name -> "module:Class", imported when used. Adding an attack: one file + one line here.
_REGISTRY = Registry("attack", "undo attacks", {
    "relearn": "undo.attacks.relearn:Relearn",
    "relearn_lora": "undo.attacks.relearn_lora:RelearnLora",
    "heldout_relearn": "undo.attacks.heldout_relearn:HeldoutRelearn",
    "quantize": "undo.attacks.quantize:Quantize",
    "fewshot": "undo.attacks.fewshot:Fewshot",
    "probe": "undo.attacks.probe:Probe",
    "suffix": "undo.attacks.suffix:Suffix",
    "ablate": "undo.attacks.ablate:Ablate",
})


def point_label(point: dict[str, Any]) -> str:
    """A compact label of an attack point: lr0.001, bits4, k16-mode=x, run (no settings)."""
    return "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(point.items())) or "run"


class Attack(abc.ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type]
    version: ClassVar[int] = 1          # bump when the attack's semantics change (part of the cache key)
    reads: ClassVar[tuple[str, ...]] = ()  # starting models it reads besides its target: run() gets <name>_dir
    # The curve metric the report's attack matrix shows for this attack (None: the task's forget
    # metric, read in the task's direction) and, for another metric, whether higher = more recovered.
    matrix_metric: ClassVar[Optional[str]] = None
    matrix_higher_is_better: ClassVar[bool] = True
    # Whether the attack seed changes anything (data order, samples, search). An attack that is a
    # function of the model alone (quantization) runs once per model: the first attack seed.
    seeded: ClassVar[bool] = True

    def __init__(self, options: Any):
        self.options = options

    def points(self) -> list[dict[str, Any]]:
        """The independent runs of this attack (JSON-able); each is one stage per model."""
        return [{}]

    def point_label(self, point: dict[str, Any]) -> str:
        return point_label(point)

    def key_options(self) -> dict[str, Any]:
        """The options one run depends on besides its point (override to drop the list the
        points come from, so that adding a learning rate does not invalidate the others).
        The attack is rebuilt from these for each run."""
        from ..config import to_dict

        return to_dict(self.options)

    @abc.abstractmethod
    def run(self, exp: Any, model_dir: Path, point: dict[str, Any], seed: int, desc: str) -> dict[str, Any]:
        """Attack the checkpoint at `model_dir`; return the sidecar (curve, flops, wall_seconds)."""


def known_attacks() -> list[str]:
    return list(_REGISTRY)


def register_attack(name: str, target: "str | type[Attack]") -> None:
    """Add an attack from outside the package ("module:Class" or the class itself)."""
    _REGISTRY.register(name, target)


def attack_class(name: str) -> type[Attack]:
    return _REGISTRY.get_class(name)


def attack_options(name: str, options: Optional[dict[str, Any]], where: str = "attack options") -> Any:
    return from_dict(attack_class(name).Options, options or {}, where)


def build_attack(name: str, options: Optional[dict[str, Any]] = None) -> Attack:
    return attack_class(name)(attack_options(name, options, f"attack '{name}' options"))
