"""The attack stage: one run (one point, e.g. one learning rate) of one attack on one model."""

from __future__ import annotations

from ..attacks import attack_class, build_attack
from .base import StageContext, StageOutput

VERSION = 1


def attack_seed(seed: int, attack_seed_index: int) -> int:
    """The seed of an attack run: the model's seed for attack seed 0 (so one attack seed
    gives the numbers it always gave), spaced apart for the others."""
    return seed + 7919 * attack_seed_index


def version(params: dict) -> int:
    return attack_class(params["attack"]).version


def run(ctx: StageContext) -> StageOutput:
    p = ctx.params
    attack = build_attack(p["attack"], p["options"])
    desc = f"{p['attack']} {ctx.node.name} {attack.point_label(p['point'])}"
    extra = {f"{name}_dir": ctx.inputs[name].model_dir for name in attack.reads if name in ctx.inputs}
    sidecar = attack.run(ctx.exp, ctx.inputs["target"].model_dir, p["point"],
                         attack_seed(ctx.exp.seed, p["attack_seed"]), desc, **extra)
    return StageOutput({"target": ctx.node.name, "attack": p["attack"], "point": p["point"],
                        "attack_seed": p["attack_seed"], **sidecar})
