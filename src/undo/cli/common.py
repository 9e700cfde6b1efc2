"""What the subcommands share: config arguments, run directories, checkpoints given by path."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import apply_overrides, parse_override
from ..errors import UndoError


def add_config_args(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("config", nargs=None if config_required else "?", default="arithmetic",
                   help="experiment YAML file or preset name (default: arithmetic; see `undo presets`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set pretrain.steps=200 (repeatable)")
    p.add_argument("--run-dir", "--out", dest="run_dir", default=None,
                   help="run directory, where artifacts go (default: runs/<experiment name>)")


def run_dir_for(args: argparse.Namespace, name: str) -> Path:
    return Path(args.run_dir).expanduser() if args.run_dir else Path("runs") / name


def model_label(path: str | Path) -> str:
    """A model's name for results: its stage (`runs/x/seed0/undo/undo_a0.3` or `.../undo_a0.3/model`
    are both undo_a0.3), else the directory's name."""
    path = Path(path).expanduser().resolve()
    return path.parent.name if path.name == "model" else path.name


def external_artifact(model_dir: str):
    """A stage input from the command line: a run's `<stage>/` or `<stage>/model` directory
    (its Artifact, cache key included) or any HF model directory."""
    from ..artifacts import model_source

    path = Path(model_dir).expanduser()
    if not path.exists():
        raise UndoError(f"model path {path} does not exist; give a checkpoint directory such as runs/<name>/seed0/base")
    if not ((path / "config.json").exists() or (path / "model" / "config.json").exists()
            or (path / "result.json").exists()):
        raise UndoError(f"{path} is not a model directory (no config.json); give a checkpoint such as "
                        f"runs/<name>/seed0/base/model")
    return model_source(path)


def split_overrides(overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """`method.X=V` -> method options, `train.X=V` -> TrainConfig overrides, the rest -> experiment config."""
    sections: dict[str, dict[str, Any]] = {"method": {}, "train": {}}
    rest = []
    for text in overrides:
        path, _ = parse_override(text)
        if path[0] in sections and len(path) > 1:
            sections[path[0]] = apply_overrides(sections[path[0]], [text.split(".", 1)[1]])
        else:
            rest.append(text)
    return sections["method"], sections["train"], rest


def parse_sweep(texts: list[str]) -> dict[str, list[Any]]:
    """`--sweep lr=1e-5,3e-5` -> {"lr": [1e-05, 3e-05]}."""
    sweep: dict[str, list[Any]] = {}
    for text in texts:
        if "=" not in text:
            raise UndoError(f"--sweep {text!r}: expected KEY=V1,V2,..., e.g. --sweep lr=1e-4,3e-4")
        key, raw = text.split("=", 1)
        values = [parse_override(f"x={v.strip()}")[1] for v in raw.split(",") if v.strip()]
        if not key.strip() or not values:
            raise UndoError(f"--sweep {text!r}: expected KEY=V1,V2,..., e.g. --sweep lr=1e-4,3e-4")
        sweep[key.strip()] = values
    return sweep
