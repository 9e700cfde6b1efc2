"""One stage outside a graph: the stage commands (`undo pretrain`, `undo unlearn`, `undo distill`,
`undo attack`, `undo noise`) and the Python API for scripts and tests. Inputs are
checkpoints given by path (or artifacts of a run); a stage's cache key hashes their keys
(a run's stage key, else the files' names, sizes and times), and the stage goes through the
same helper as in a graph: cached, resumable, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from ..artifacts import Artifact, ModelDir, model_source, source_key
from ..attacks import build_attack
from ..errors import UndoError
from ..experiment import ExperimentConfig, Recipe
from ..stages.base import StageNode
from ..store import ResultStore
from .graph import attack_params, build_graph, distill_params, stage_key, unlearn_params
from .runner import run_stage

Source = Artifact | ModelDir


def as_source(model: str | Path | Source) -> Source:
    return model if isinstance(model, (Artifact, ModelDir)) else model_source(model)


def keyed(node: StageNode, sources: dict[str, Source]) -> StageNode:
    """`node` with its cache key and inputs set from its input checkpoints."""
    node.key = stage_key(node.kind, node.params, node.seed, {role: source_key(s) for role, s in sources.items()})
    node.inputs = {role: str(s.model_dir) for role, s in sources.items()}
    return node


def run_single(node: StageNode, exp: Any, run_dir: Path, sources: dict[str, Source],
               store: Optional[ResultStore] = None, force: bool = False) -> Artifact:
    """One stage on given checkpoints. Its place is chosen on the command line (`--name`), so it
    never replaces an artifact of another kind of stage (`undo distill --name unlearn/rmu`)."""
    node = keyed(node, sources)
    if not force:
        Artifact(Path(run_dir), node.id).check_replaceable(node.kind)
    return run_stage(node, exp, Path(run_dir), sources, store, force=force)


def pretrain(exp: ExperimentConfig, run_dir: Path, which: str = "base") -> Artifact:
    """A starting model of the experiment (for its seed), as in `undo run`: <run_dir>/seed<s>/<which>."""
    one = exp.for_seed(exp.seed)
    node = build_graph(one).nodes.get(f"seed{exp.seed}/{which}")
    if node is None:
        raise UndoError(f"the experiment has no starting model '{which}'; models: {', '.join(exp.models)}")
    return run_stage(node, one, Path(run_dir), {})


def unlearn(exp: ExperimentConfig, run_dir: Path, recipe: Recipe, model: str | Path | Source,
            teacher: Optional[str | Path | Source] = None) -> Artifact:
    """One unlearning run from `model` (no sweep): <run_dir>/unlearn/<name>."""
    params, method = unlearn_params(exp, recipe)
    if method.aux_models():
        raise UndoError(f"method '{recipe.method}' trains auxiliary models; run it in an experiment (`undo run`)")
    sources = {"model": as_source(model)}
    if "teacher" in method.needs():
        if teacher is None:
            raise UndoError(f"method '{recipe.method}' needs a teacher model (the oracle); pass --teacher PATH")
        sources["teacher"] = as_source(teacher)
    node = StageNode(f"unlearn/{recipe.label}", "unlearn", recipe.label, exp.seed, params, record="method")
    return run_single(node, exp, run_dir, sources)


def distill(exp: ExperimentConfig, run_dir: Path, name: str, teacher: str | Path | Source,
            student: Literal["noised", "random", "model"] = "noised", alpha: float = 0.0,
            student_model: Optional[str | Path | Source] = None, steps: Optional[int] = None) -> Artifact:
    """Distill `teacher` into a noised copy, a random model or `student_model`: <run_dir>/<name>."""
    sources = {"teacher": as_source(teacher)}
    if student_model is not None:
        sources["student"] = as_source(student_model)
    params = distill_params(exp, student, alpha, exp.undo.distill.steps if steps is None else steps)
    return run_single(StageNode(name, "distill", name, exp.seed, params, record="undo"), exp, run_dir, sources)


def noise(model: str | Path | Source, out: Path, alpha: float, beta: float, seed: int,
          force: bool = False) -> Artifact:
    """UNDO's noise step alone: a noised copy of `model` written to `out`. An `out` that
    exists and is not empty is refused (unless it is this very noise, cached, or `force`)."""
    out = Path(out).expanduser()
    params = {"alpha": alpha, "beta": beta, "noise_seed": seed}
    sources = {"model": as_source(model)}
    node = keyed(StageNode(out.name, "noise", out.name, seed, params), sources)
    if out.exists() and not out.is_dir():
        raise UndoError(f"--out {out} is a file; give a new directory for the noised checkpoint (nothing was written)")
    if not force and out.exists() and any(out.iterdir()) and not Artifact(out.parent, out.name).is_done(node.key):
        raise UndoError(f"--out {out} exists and is not empty; give a new directory, or add --force to replace "
                        f"its contents (nothing was written)")
    return run_stage(node, ExperimentConfig(), out.parent, sources, force=force)


def attack(exp: ExperimentConfig, run_dir: Path, name: str, target: str | Path | Source, kind: str = "relearn",
           options: Optional[dict[str, Any]] = None, attack_seed: int = 0) -> list[Artifact]:
    """Every run (point) of one attack on one model: <run_dir>/attack/<kind>/<name>/<point>."""
    spec = next((s for s in exp.attacks if s.name == kind), None)
    method = build_attack(kind, options if options is not None else (spec.options if spec else {}))
    arts = []
    for point in method.points():
        node = StageNode(f"attack/{kind}/{name}/{method.point_label(point)}", "attack", name, exp.seed,
                         attack_params(exp, method, kind, point, attack_seed))
        arts.append(run_single(node, exp, run_dir, {"target": as_source(target)}))
    return arts
