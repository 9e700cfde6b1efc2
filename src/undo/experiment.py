"""The experiment config: every section of one `undo run`, typed and validated."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Literal, Optional

from .config import apply_overrides, from_dict, load_yaml
from .errors import UndoError
from .models import ModelConfig
from .tasks import TaskConfig
from .training import TrainConfig
from .attacks.relearn import AttackConfig
from .undo import UndoConfig
from .methods.config import UnlearnConfig


@dataclasses.dataclass
class TokenizerConfig:
    kind: Literal["char", "bpe"] = "bpe"
    vocab_size: int = 1024
    # False: a number is one token where the vocabulary allows (arithmetic becomes fact
    # lookup, which a 1M-parameter model learns ~10x faster than digit-by-digit answers).
    split_digits: bool = False
    path: Optional[str] = None  # an existing HF tokenizer directory instead of training one


def _pretrain_default() -> TrainConfig:
    return TrainConfig()


@dataclasses.dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    pretrain: TrainConfig = dataclasses.field(default_factory=_pretrain_default)
    unlearn: UnlearnConfig = dataclasses.field(default_factory=UnlearnConfig)
    undo: UndoConfig = dataclasses.field(default_factory=UndoConfig)
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)


PRESET_PACKAGE = "undo.experiments"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if stem in preset_names():
        return Path(str(resources.files(PRESET_PACKAGE) / f"{stem}.yaml"))
    raise UndoError(f"no config file or preset named '{name_or_path}'; presets: {', '.join(preset_names())}")


def load_experiment(name_or_path: str, overrides: list[str] = ()) -> ExperimentConfig:
    raw = load_yaml(resolve_config_path(name_or_path))
    raw = apply_overrides(raw, list(overrides))
    return from_dict(ExperimentConfig, raw, "config")
