"""The experiment config: what one `undo run` builds, as data.

An experiment names a task, the models to start from (pretrained by the engine or given
as checkpoints), unlearning recipes (a method, its options and training settings,
optionally a sweep whose winner a rule picks), which recipes UNDO follows, a list of
attacks, and seeds. `engine.graph.build_graph` turns it into a graph of stages; nothing
here knows how a stage runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

from .attacks import attack_options
from .config import apply_overrides, expand_path, from_dict, load_yaml
from .errors import UndoError
from .models import ModelConfig
from .tasks import TaskConfig
from .tokenization import BPE_MIN_VOCAB
from .training import TrainConfig


@dataclasses.dataclass
class TokenizerConfig:
    kind: Literal["char", "bpe"] = "bpe"
    vocab_size: int = 1024
    # False: a number is one token where the vocabulary allows (arithmetic becomes fact
    # lookup, which a 1M-parameter model learns ~10x faster than digit-by-digit answers).
    split_digits: bool = False
    path: Optional[str] = None  # an existing HF tokenizer directory instead of training one

    def validate(self, where: str) -> None:
        self.path = expand_path(self.path)
        if self.path is None and self.kind == "bpe" and self.vocab_size < BPE_MIN_VOCAB:
            raise UndoError(f"{where}.vocab_size {self.vocab_size} is below the {BPE_MIN_VOCAB} tokens a byte-level BPE "
                            f"needs (256 bytes + 4 special tokens); set {where}.vocab_size to at least {BPE_MIN_VOCAB}")
        if self.vocab_size < 1:
            raise UndoError(f"{where}.vocab_size must be positive, got {self.vocab_size}")


@dataclasses.dataclass
class StartModel:
    """A model the graph starts from: pretrained by the engine on `data`, or a checkpoint."""

    data: Literal["all", "retain"] = "all"  # all = retain + forget (base); retain = data filtering (oracle)
    path: Optional[str] = None              # a local Hugging Face checkpoint instead of pretraining
    train: dict[str, Any] = dataclasses.field(default_factory=dict)  # over the experiment's `pretrain`

    def validate(self, where: str) -> None:
        self.path = expand_path(self.path)


def _default_models() -> dict[str, StartModel]:
    return {"base": StartModel("all"), "oracle": StartModel("retain")}


def _number(value: Any) -> Any:
    """YAML reads 1e-4 (no dot) as a string; a sweep value that looks like a number is one."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def _check_name(name: str, where: str) -> None:
    if not name or "/" in name or name.startswith(".") or name.startswith("seed"):
        raise UndoError(f"{where} {name!r} is not a usable name; use letters, digits, - and _ "
                        f"(not starting with '.' or 'seed')")


def _check_sweep(sweep: dict[str, list[Any]], where: str) -> None:
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise UndoError(f"{where}.{key}: give a non-empty list of values, e.g. [1.0e-4, 3.0e-4]")
        sweep[key] = [_number(v) for v in values]


@dataclasses.dataclass
class Recipe:
    """One unlearning recipe: a method, its options and TrainConfig overrides, the model it
    starts from, and optionally a sweep (a grid whose winner `unlearn.pick` chooses)."""

    method: str
    name: Optional[str] = None                                           # artifact name (default: method)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)    # the method's Options fields
    train: dict[str, Any] = dataclasses.field(default_factory=dict)      # TrainConfig fields over the method's defaults
    start: str = "base"                  # which starting model (a key of `models`)
    teacher: Optional[str] = None        # starting model handed to methods that need a teacher (default: oracle)
    sweep: dict[str, list[Any]] = dataclasses.field(default_factory=dict)  # {lr: [1e-4, 3e-4], an option: [...]}

    @property
    def label(self) -> str:
        return self.name or self.method

    def validate(self, where: str) -> None:
        from .methods.base import resolve_options

        resolve_options(self.method, self.options)  # unknown method / option names raise here
        from_dict(TrainConfig, self.train, f"{where}.train")
        if self.name is not None:
            _check_name(self.name, f"{where}.name")
        _check_sweep(self.sweep, f"{where}.sweep")

    def points(self, extra_sweep: Optional[dict[str, list[Any]]] = None) -> list["Recipe"]:
        """The runs of the recipe's grid (its own sweep over `extra_sweep`, the experiment-wide
        one); each key is a TrainConfig field or an option of the method. Names get a suffix
        per swept value, e.g. graddiff-lr=0.0003. No sweep: [self]."""
        from .methods.base import method_class

        sweep = {**(extra_sweep or {}), **self.sweep}
        if not sweep:
            return [self]
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        option_fields = {f.name for f in dataclasses.fields(method_class(self.method).Options)}
        for key in sweep:
            if key not in train_fields and key not in option_fields:
                raise UndoError(f"sweep key '{key}' is neither a training setting ({', '.join(sorted(train_fields))}) "
                                f"nor an option of {self.method} ({', '.join(sorted(option_fields)) or 'none'})")
        runs = []
        for values in itertools.product(*sweep.values()):
            train_over, options = dict(self.train), dict(self.options)
            for key, value in zip(sweep, values):
                (train_over if key in train_fields else options)[key] = value
            suffix = "-".join(f"{k}={short(v)}" for k, v in zip(sweep, values))
            runs.append(dataclasses.replace(self, name=f"{self.label}-{suffix}", options=options,
                                            train=train_over, sweep={}))
        return runs


def short(value: Any) -> str:
    """A value as names and tables show it (1e-4, not 0.0001000)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default_recipes() -> list[Recipe]:
    return [Recipe("graddiff"), Recipe("maxent"), Recipe("rmu")]


@dataclasses.dataclass
class UnlearnConfig:
    methods: list[Recipe] = dataclasses.field(default_factory=_default_recipes)
    # A model qualifies (as UNDO's teacher, or as a sweep's winner) when its retain metric is
    # within this fraction of its starting model's; among those the strongest forgetting wins.
    retain_tolerance: float = 0.1
    # Grid applied to every recipe (a recipe's own `sweep` adds to it): {lr: [1e-4, 3e-4]}.
    sweep: dict[str, list[Any]] = dataclasses.field(default_factory=dict)

    def validate(self, where: str) -> None:
        if not 0 <= self.retain_tolerance:
            raise UndoError(f"{where}.retain_tolerance must be >= 0, got {self.retain_tolerance}")
        _check_sweep(self.sweep, f"{where}.sweep")
        names = [run.label for run in self.methods]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UndoError(f"{where}.methods: two recipes are named {', '.join(dupes)}; give each a distinct `name`")


def _distill_default() -> TrainConfig:
    return TrainConfig(steps=1000, lr=2e-3, schedule="cosine", warmup_steps=20, eval_every=25)


@dataclasses.dataclass
class UndoConfig:
    # Which recipes UNDO follows: auto = the strongest forgetting within unlearn.retain_tolerance
    # of the base's retain metric (one teacher); all = every method recipe; or a list of names.
    after: Union[Literal["auto", "all", "none"], list[str]] = "auto"
    alphas: list[float] = dataclasses.field(default_factory=lambda: [0.3, 0.6, 0.8])
    beta: float = 0.1                   # paper: 0.1 on synthetic tasks, 0 (pure shrink) for WMDP
    temperature: float = 1.0
    data: Literal["mixture", "retain"] = "mixture"  # what the student is distilled on
    # When the student's retain metric has recovered: within stop_tolerance of the teacher's, absolute
    # (|teacher - student|) or relative (a fraction of the teacher's). auto: absolute for accuracies,
    # relative for cross-entropies (the paper's rules: 0.05 accuracy, 5% CE). none: never.
    stop_rule: Literal["auto", "absolute", "relative", "none"] = "auto"
    stop_tolerance: float = 0.05
    stop_at_recovery: bool = True       # false: train the whole budget, still recording the recovery step
    distill: TrainConfig = dataclasses.field(default_factory=_distill_default)
    unlearn_and_distill: bool = True    # also distill into a randomly initialised student
    unlearn_and_distill_steps: Optional[int] = None  # budget for it (default: distill.steps)

    def validate(self, where: str) -> None:
        for a in self.alphas:
            if not 0.0 <= a <= 1.0:
                raise UndoError(f"{where}.alphas: alpha {a} is outside [0, 1]")
        if self.temperature <= 0:
            raise UndoError(f"{where}.temperature must be > 0")
        if not self.stop_tolerance >= 0:
            raise UndoError(f"{where}.stop_tolerance must be >= 0, got {self.stop_tolerance}")


@dataclasses.dataclass
class QualityGate:
    """What happens when a pretrained starting model misses its task's quality gate
    (`Task.quality_gate`; arithmetic: `task.options.gate_acc` on every operation)."""

    on_miss: Literal["fail", "mark"] = "mark"  # fail: stop with one line (exit 2); mark: go on, the report marks it
    extend_steps: int = 0   # while below the gate, train this many more steps at a time (a warm restart of the schedule)
    max_steps: int = 0      # ... up to this many pretraining steps in all (0: no extension)

    def validate(self, where: str) -> None:
        if self.extend_steps < 0 or self.max_steps < 0:
            raise UndoError(f"{where}: extend_steps and max_steps must be >= 0")
        if self.max_steps and not self.extend_steps:
            raise UndoError(f"{where}.max_steps {self.max_steps} needs extend_steps (the size of one extra chunk), e.g. 600")


@dataclasses.dataclass
class AttackSpec:
    """One attack of the experiment, applied to every model (`targets: all`) or to named ones."""

    name: str = "relearn"
    targets: Union[Literal["all"], list[str]] = "all"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self, where: str) -> None:
        attack_options(self.name, self.options, f"{where}.options")  # unknown attack / options raise here


def _default_attacks() -> list[AttackSpec]:
    return [AttackSpec("relearn")]


@dataclasses.dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0                       # the seed of a one-seed experiment (ignored when `seeds` is given)
    seeds: list[int] = dataclasses.field(default_factory=list)        # replicate the whole graph per seed
    attack_seeds: list[int] = dataclasses.field(default_factory=lambda: [0])  # replicate only the attacks
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    pretrain: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    models: dict[str, StartModel] = dataclasses.field(default_factory=_default_models)
    quality_gate: QualityGate = dataclasses.field(default_factory=QualityGate)
    unlearn: UnlearnConfig = dataclasses.field(default_factory=UnlearnConfig)
    undo: UndoConfig = dataclasses.field(default_factory=UndoConfig)
    attacks: list[AttackSpec] = dataclasses.field(default_factory=_default_attacks)

    def validate(self, where: str) -> None:
        self.models = {name: from_dict(StartModel, spec, f"{where}.models.{name}") for name, spec in self.models.items()}
        for name, spec in self.models.items():
            _check_name(name, f"{where}.models key")
            from_dict(TrainConfig, {**dataclasses.asdict(self.pretrain), **spec.train}, f"{where}.models.{name}.train")
        if "base" not in self.models:
            raise UndoError(f"{where}.models needs a 'base' (e.g. base: {{data: all}}, or base: {{path: DIR}})")
        for i, recipe in enumerate(self.unlearn.methods):
            for role, model in (("start", recipe.start), ("teacher", recipe.teacher)):
                if model is not None and model not in self.models:
                    raise UndoError(f"{where}.unlearn.methods[{i}].{role}: no starting model '{model}'; "
                                    f"models are {', '.join(self.models)}")
            if recipe.label in self.models:
                raise UndoError(f"{where}.unlearn.methods[{i}]: name '{recipe.label}' is also a starting model")
        if len(set(self.all_seeds())) != len(self.all_seeds()) or len(set(self.attack_seeds)) != len(self.attack_seeds):
            raise UndoError(f"{where}: seeds and attack_seeds must not repeat a value")
        if not self.attack_seeds:
            raise UndoError(f"{where}.attack_seeds: give at least one, e.g. [0]")

    def all_seeds(self) -> list[int]:
        return list(self.seeds) or [self.seed]

    def for_seed(self, seed: int) -> "ExperimentConfig":
        """This experiment with one seed: what every stage of that seed sees."""
        return dataclasses.replace(self, seed=seed, seeds=[seed])


PRESET_PACKAGE = "undo.experiments"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def preset_summary(name: str, width: int = 100) -> str:
    """The first sentence of a preset's header comment (cut to `width` characters), for `undo presets`."""
    lines = (resources.files(PRESET_PACKAGE) / f"{name}.yaml").read_text().splitlines()
    header = " ".join(line[1:].strip() for line in itertools.takewhile(lambda x: x.startswith("#"), lines))
    sentence = re.split(r"(?<!\bal)\.\s", header)[0].rstrip(".")  # "et al. 2022" does not end it
    return sentence if len(sentence) <= width else sentence[:width - 3].rstrip() + "..."


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if stem in preset_names():
        return Path(str(resources.files(PRESET_PACKAGE) / f"{stem}.yaml"))
    raise UndoError(f"no config file or preset named '{name_or_path}'; presets: {', '.join(preset_names())}")


_RENAMED = {"attack": "attacks (a list: attacks: [{name: relearn, options: {...}}])",
            "undo.teacher": "undo.after (auto, all, or a list of recipe names)"}


def merge(parent: dict, child: dict) -> dict:
    """`child` over `parent`: mappings merge key by key, anything else (lists too) is replaced."""
    out = dict(parent)
    for key, value in child.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_raw(name_or_path: str, chain: tuple[str, ...] = ()) -> dict:
    """A config file as a mapping; `extends: NAME` (a preset, or a file beside this one) is
    read first and this file's keys go over it."""
    path = resolve_config_path(name_or_path)
    if str(path.resolve()) in chain:
        raise UndoError(f"config {path}: 'extends' loops back to itself; remove the cycle")
    raw = load_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    beside = path.parent / str(parent)
    base = load_raw(str(beside) if beside.is_file() else str(parent), chain + (str(path.resolve()),))
    return merge(base, raw)


def load_experiment(name_or_path: str, overrides: list[str] = ()) -> ExperimentConfig:
    raw = load_raw(name_or_path)
    raw = apply_overrides(raw, list(overrides))
    if "attack" in raw or "teacher" in (raw.get("undo") or {}):
        old = "attack" if "attack" in raw else "undo.teacher"
        raise UndoError(f"config: '{old}' was replaced by {_RENAMED[old]}; update the config")
    return from_dict(ExperimentConfig, raw, "config")
