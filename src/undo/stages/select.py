"""Selection: pick one model among candidates by a rule, without copying it.

Used for a sweep's winner and for UNDO's teacher (`undo.after: auto`). The rule: the
strongest forgetting among the candidates whose retain metric stays within `tolerance`
(relative) of their starting model's. The artifact is a sidecar that points to the winner
(`model_path`), with the winner's metrics, so later stages read it like any model.

Compute (param `compute`): a sweep's winner could only be chosen after every point ran, so it
inherits the compute of all candidates ("all"); UNDO's teacher choice inherits the winner's
only ("chosen"): the other methods are models of their own, reported with their own compute.
"""

from __future__ import annotations

from typing import Any, Optional

from ..errors import UndoError
from .base import StageContext, StageOutput

VERSION = 1


def select_teacher(results: list[dict[str, Any]], base_retain: float, tolerance: float,
                   higher_is_better: bool, forget_metric: Optional[str] = None,
                   retain_metric: Optional[str] = None) -> str:
    """The name of the result with the strongest forgetting among those whose retain
    metric stays within `tolerance` (relative) of the base model's `base_retain`.

    A result is a dict with "name" and either "forget"/"retain" values or "metrics" (a
    task's metric dict, read at `forget_metric`/`retain_metric`; default forget_acc/retain_acc
    when higher is better, else forget_ce/retain_ce). Raises UndoError naming the closest
    miss when none qualifies."""
    if not results:
        raise UndoError("no unlearning results to choose from; run `undo unlearn` first")
    suffix = "acc" if higher_is_better else "ce"
    forget_key, retain_key = forget_metric or f"forget_{suffix}", retain_metric or f"retain_{suffix}"

    def value(r: dict[str, Any], short: str, key: str) -> float:
        return r[short] if short in r else r["metrics"][key]

    scored = [(r["name"], value(r, "forget", forget_key), value(r, "retain", retain_key)) for r in results]
    if higher_is_better:  # accuracy: retain may fall by a fraction; lower forget accuracy is stronger
        qualifies = [s for s in scored if s[2] >= base_retain * (1 - tolerance)]
        strength = lambda s: (-s[1], s[2])
    else:                 # cross-entropy: retain may rise by a fraction; higher forget CE is stronger
        qualifies = [s for s in scored if s[2] <= base_retain * (1 + tolerance)]
        strength = lambda s: (s[1], -s[2])
    if not qualifies:
        closest = (max if higher_is_better else min)(scored, key=lambda s: s[2])
        raise UndoError(f"no unlearned model keeps its retain metric within {tolerance * 100:g}% of the base model's "
                        f"({base_retain:.4g}); the closest is {closest[0]} at {closest[2]:.4g}. "
                        f"Sweep smaller learning rates or fewer steps, or raise unlearn.retain_tolerance")
    return max(qualifies, key=strength)[0]  # ties: the better retain metric wins


def run(ctx: StageContext) -> StageOutput:
    """Inputs "c:<name>" are the candidates, "start" the model whose retain metric is the level."""
    task = ctx.task
    candidates = {role[2:]: ctx.inputs[role] for role in ctx.inputs if role.startswith("c:")}
    results = {name: art.result() or {} for name, art in candidates.items()}
    level = ctx.input_result("start")["metrics"][task.retain_metric]
    chosen = select_teacher([{"name": n, "metrics": r["metrics"]} for n, r in results.items()], level,
                            ctx.params["tolerance"], task.higher_is_better, task.forget_metric, task.retain_metric)
    ctx.say(f"{ctx.params['what']}: {chosen}")
    winner = results[chosen]
    keep = ("method", "metrics", "metrics_before", "flops", "flops_total", "steps", "wall_seconds", "train", "options")
    paid = list(results) if ctx.params.get("compute", "chosen") == "all" else [chosen]
    return StageOutput({**{k: winner[k] for k in keep if k in winner}, "chosen": chosen,
                        "lineage": [f"c:{n}" for n in paid],
                        "record_flops": sum(float(results[n].get("record_flops", results[n].get("flops", 0.0)))
                                            for n in paid),
                        "chosen_stage": ctx.node.inputs[f"c:{chosen}"],
                        "model_path": str(candidates[chosen].model_dir), "flops": 0.0,
                        "candidates": {n: {"forget": r["metrics"][task.forget_metric],
                                           "retain": r["metrics"][task.retain_metric]} for n, r in results.items()}})
