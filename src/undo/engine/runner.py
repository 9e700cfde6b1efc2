"""The one stage helper: look up the cache, claim, run, save atomically, record.

Every stage of every command goes through `run_stage`:
- done: an artifact whose result.json carries the node's cache key is reused as it is;
- claimed: one process at a time runs a stage (a lock file in `<run>/.locks`), so executors
  that run stages in parallel (Ray) never run one twice; after the lock the cache is
  checked again;
- resumable: the stage's resume point lives in `<stage>.resume/<key>`; resume points of
  other keys (an older config) are deleted, never resumed; a stage that diverges (NaN)
  leaves no resume point behind;
- atomic: the artifact is built in `<stage>.partial` and renamed into place;
- recorded: the model row or attack curve goes into the results store, if one is given,
  tagged with the node's seed and key, also when the stage came from the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from .. import distributed
from ..artifacts import Artifact, ModelDir
from ..errors import DivergedError, UndoError, write_errors
from ..log import say
from ..stages import LINEAGE, STAGES
from ..stages.base import StageContext, StageNode
from ..store import ResultStore


@contextlib.contextmanager
def claim(run_dir: Path, stage_id: str, exclusive: bool) -> Iterator[None]:
    """Hold `<run_dir>/.locks/<stage>.lock` while running the stage, when stages may run side
    by side (`exclusive`: the Ray executor). Under a multi-process launch all processes run
    every stage together, so there is nothing to claim."""
    if not exclusive or distributed.world_size() > 1:
        yield
        return
    lock = Path(run_dir) / ".locks" / (stage_id.replace("/", "__") + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")
    except OSError as e:
        raise UndoError(f"cannot write in {lock.parent} ({e.strerror}); choose a writable --run-dir") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_resume_dir(art: Artifact, key: str) -> tuple[Path, float]:
    """`<stage>.resume/<key>`, with resume points of other keys removed; and the seconds
    already spent in an interrupted attempt of this key (so stage times survive a resume)."""
    resume = art.resume_dir / key
    if art.resume_dir.exists() and distributed.is_main_process():
        for stale in art.resume_dir.iterdir():
            if stale.name not in (key, key + ".tmp", key + ".old"):
                shutil.rmtree(stale, ignore_errors=True)
    with write_errors(resume.parent):  # e.g. a file where the run directory should be
        resume.parent.mkdir(parents=True, exist_ok=True)
    state = resume / "state.json"
    spent = json.loads(state.read_text()).get("elapsed", 0.0) if state.exists() else 0.0
    return resume, spent


def lineage_roles(kind: str, sidecar: dict[str, Any], inputs: dict[str, Any]) -> list[str]:
    """The input roles whose compute the output inherits (`stages.LINEAGE`, or the sidecar's own)."""
    declared = sidecar.get("lineage") or LINEAGE.get(kind, ())
    declared = [declared] if isinstance(declared, str) else list(declared)
    return [role for role in inputs if any(role == d or (d.endswith(":") and role.startswith(d)) for d in declared)]


def flops_ancestry(node: StageNode, sidecar: dict[str, Any], inputs: dict[str, Artifact | ModelDir]) -> dict[str, float]:
    """The own FLOPs of every stage the output depends on, by stage id, this one included. A set,
    not a sum along paths: a stage reached twice (the base under a student and its teacher) counts
    once. An input without an ancestry (a checkpoint from elsewhere) counts its flops_total."""
    out: dict[str, float] = {}
    for role in lineage_roles(node.kind, sidecar, inputs):
        parent = inputs[role].result() or {}
        total = float(parent.get("flops_total", parent.get("flops", 0.0)))
        out.update(parent.get("flops_ancestry") or {str(node.inputs.get(role, role)): total})
    out[node.id] = float(sidecar.get("flops", 0.0))
    return out


def run_stage(node: StageNode, exp: Any, run_dir: Path, inputs: dict[str, Artifact | ModelDir],
              store: Optional[ResultStore] = None, exclusive: bool = False, force: bool = False) -> Artifact:
    """Run `node` (or reuse its cached artifact) and return its artifact. `exclusive`: other
    processes may run stages of the same run at the same time (claim the stage first).
    A directory in the stage's place that undo did not write is refused before any work
    (`Artifact.check_replaceable`), unless `force`. (An artifact of another kind of stage is
    replaced: a recipe given a sweep turns `unlearn/<name>` from an unlearn stage into a selection.)"""
    art = Artifact(run_dir, node.id)
    if not art.is_done(node.key):
        if not force:
            art.check_replaceable()
        with claim(run_dir, node.id, exclusive):
            if not art.is_done(node.key):
                _run_and_write(node, exp, art, inputs, force)
                cached = False
            else:
                cached = True
    else:
        cached = True
    if cached:
        say(f"{node.id}: cached")
    if store is not None and distributed.is_main_process():
        record(store, node, art.result(), cached)
    return art


def _run_and_write(node: StageNode, exp: Any, art: Artifact, inputs: dict[str, Artifact | ModelDir],
                   force: bool = False) -> None:
    resume, spent = prepare_resume_dir(art, node.key)
    ctx = StageContext(node=node, exp=exp, inputs=inputs, resume_dir=resume, say=say)
    t0 = time.time()
    try:
        out = STAGES[node.kind][0](ctx)
    except DivergedError:
        if distributed.is_main_process():  # a diverged run's resume points would diverge again
            shutil.rmtree(art.resume_dir, ignore_errors=True)
        raise
    except UndoError:  # bad input found inside the stage: leave no empty directories behind
        _drop_empty_resume_dir(art)
        raise
    sidecar = {**out.sidecar, "name": node.name, "kind": node.kind, "seed": node.seed,
               "params": node.params, "inputs": {role: src for role, src in node.inputs.items()},
               "task": node.params.get("task", out.sidecar.get("task")),
               "stage_seconds": spent + time.time() - t0}
    sidecar["flops_ancestry"] = flops_ancestry(node, sidecar, inputs)
    sidecar["flops_total"] = sum(sidecar["flops_ancestry"].values())  # compute from scratch
    try:
        art.write(node.key, sidecar, model=out.model, tokenizer=out.tokenizer, state_dict=out.state_dict, force=force)
    except UndoError:  # the artifact could not be written (disk full): its resume points, if any, stay
        _drop_empty_resume_dir(art)
        raise


def _drop_empty_resume_dir(art: Artifact) -> None:
    """Remove `<stage>.resume/` when it holds no resume point (nothing to resume from), and the
    directories above it that it leaves empty (`seed0/`), up to the run directory."""
    if not distributed.is_main_process() or not art.resume_dir.exists() or any(art.resume_dir.rglob("*.json")):
        return
    shutil.rmtree(art.resume_dir, ignore_errors=True)
    run_dir = art.dir.parents[len(Path(art.stage).parts) - 1]
    for parent in art.resume_dir.parents:
        if parent == run_dir or not parent.is_dir() or any(parent.iterdir()):
            break
        try:
            parent.rmdir()
        except OSError:  # another stage wrote into it meanwhile
            break


def record(store: ResultStore, node: StageNode, result: dict[str, Any], cached: bool) -> None:
    """The stage's rows in the results store: a model row, or the points of an attack curve."""
    store.record_stage_time(node.id, float(result.get("stage_seconds", 0.0)), cached, key=node.key)
    if node.kind == "attack":
        p = node.params
        for point in result["curve"]:
            store.record_attack(node.name, p["point"], point["step"],
                                {k: v for k, v in point.items() if k != "step"}, seed=node.seed,
                                attack=p["attack"], attack_seed=p["attack_seed"], key=node.key)
        return
    if not node.record:
        return
    meta = {k: result[k] for k in ("method", "alpha", "steps", "recovered", "recovered_step", "recovered_flops",
                                   "chosen", "flops_total") if k in result}
    if node.kind == "distill":
        meta["teacher"] = Path(result["teacher"]).parent.name if result.get("teacher") else None
    # a selection's own stage costs nothing; its row shows the compute of what it chose from
    flops = result.get("record_flops", result.get("flops", 0.0))
    store.record_model(node.name, node.record, result.get("metrics", {}), flops,
                       result.get("wall_seconds", 0.0), meta, seed=node.seed, key=node.key)
