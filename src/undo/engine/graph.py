"""An experiment as a graph of stages.

`build_graph(exp)` turns the experiment's data into nodes (in an order where every input
comes before its reader), per seed:

    seed<s>/<model>                    starting models: pretrain (base, oracle) or a checkpoint
    seed<s>/aux/<name>-<key>           auxiliary models methods ask for (shared when equal)
    seed<s>/unlearn/<recipe>[-<point>] one per recipe, or per sweep point + a selection
    seed<s>/select/undo_teacher        UNDO's teacher when undo.after is auto
    seed<s>/undo/[<teacher>-]undo_a<alpha>, .../unlearn_distill
    seed<s>/attack/<attack>/<model>/<point>-as<k>   one per attack run, model, attack seed

Every node's cache key hashes its kind, the stage's version, the package version, its
own settings, its seed and its inputs' keys, so keys are known before anything runs
(`undo plan`) and a change anywhere upstream reaches every stage downstream. Starting
models carry the task's version, so a task whose metrics change meaning reruns everything.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from .. import __version__
from ..artifacts import ModelDir, source_key
from ..attacks import build_attack
from ..config import config_hash, from_dict, to_dict
from ..errors import UndoError
from ..experiment import ExperimentConfig, Recipe
from ..methods.base import build_method
from ..stages import STAGES
from ..stages import attack as attack_stage
from ..stages.base import StageNode
from ..stages.unlearn import train_config
from ..tasks import task_class
from ..training import TrainConfig

ORACLE_MATCHING_METHODS = ("oracle_matching",)  # recipes recorded as oracle matching, not as methods


def stage_key(kind: str, params: dict[str, Any], seed: int, input_keys: dict[str, str]) -> str:
    version = STAGES[kind][1] if kind in STAGES else 0
    if kind == "attack":
        version = (version, attack_stage.version(params))
    return config_hash(kind, version, __version__, params, seed, sorted(input_keys.items()))


@dataclasses.dataclass
class Graph:
    exp: ExperimentConfig
    nodes: dict[str, StageNode] = dataclasses.field(default_factory=dict)

    def add(self, node: StageNode, input_keys: Optional[dict[str, str]] = None) -> StageNode:
        if node.id in self.nodes:
            return self.nodes[node.id]  # an equal auxiliary model asked for twice: one stage
        keys = input_keys if input_keys is not None else {r: self.nodes[i].key for r, i in node.inputs.items()}
        node.key = stage_key(node.kind, node.params, node.seed, keys)
        self.nodes[node.id] = node
        return node

    def models(self, seed: int) -> list[StageNode]:
        """The nodes of one seed that are models of the results (attack targets)."""
        return [n for n in self.nodes.values() if n.seed == seed and n.record and n.record != "sweep"]


def build_graph(exp: ExperimentConfig) -> Graph:
    graph = Graph(exp)
    for seed in exp.all_seeds():
        one = exp.for_seed(seed)
        starts = _add_start_models(graph, one, seed)
        recipes = _add_recipes(graph, one, seed, starts)
        _add_undo(graph, one, seed, starts, recipes)
        _add_attacks(graph, one, seed)
    return graph


def _add_start_models(graph: Graph, exp: ExperimentConfig, seed: int) -> dict[str, StageNode]:
    starts = {}
    for name, spec in exp.models.items():
        record = name if name in ("base", "oracle") else "start"
        if spec.path:
            source = ModelDir(spec.path)
            params = {"path": spec.path, "task": to_dict(exp.task), "data": spec.data,
                      "task_version": task_class(exp.task.name).version, "quality_gate": to_dict(exp.quality_gate)}
            node = StageNode(f"seed{seed}/{name}", "checkpoint", name, seed, params, record=record)
            starts[name] = graph.add(node, {"files": source_key(source)})
            continue
        train = to_dict(from_dict(TrainConfig, {**to_dict(exp.pretrain), **spec.train}, f"models.{name}.train"))
        params = {"data": spec.data, "train": train, "task": to_dict(exp.task), "model": to_dict(exp.model),
                  "tokenizer": to_dict(exp.tokenizer), "task_version": task_class(exp.task.name).version,
                  "quality_gate": to_dict(exp.quality_gate)}
        starts[name] = graph.add(StageNode(f"seed{seed}/{name}", "pretrain", name, seed, params, record=record))
    return starts


def unlearn_params(exp: ExperimentConfig, recipe: Recipe) -> tuple[dict[str, Any], Any]:
    """The unlearn stage's settings (method options and training resolved over their
    defaults, so that a changed default changes the key) and the method object."""
    method = build_method(recipe.method, recipe.options, exp.task.name, exp.seed)
    cfg = train_config(method, recipe.train, recipe.label)
    params = {"method": recipe.method, "options": to_dict(method.options), "train": to_dict(cfg),
              "task": to_dict(exp.task)}
    return params, method


def distill_params(exp: ExperimentConfig, student: str, alpha: float, steps: int) -> dict[str, Any]:
    cfg = exp.undo
    return {"beta": cfg.beta, "temperature": cfg.temperature, "data": cfg.data, "stop_rule": cfg.stop_rule,
            "stop_tolerance": cfg.stop_tolerance, "stop_at_recovery": cfg.stop_at_recovery,
            "task": to_dict(exp.task), "student": student, "alpha": alpha,
            "train": to_dict(dataclasses.replace(cfg.distill, steps=steps))}


def attack_params(exp: ExperimentConfig, attack: Any, spec_name: str, point: dict[str, Any],
                  attack_seed: int) -> dict[str, Any]:
    return {"attack": spec_name, "options": attack.key_options(), "point": point, "attack_seed": attack_seed,
            "task": to_dict(exp.task)}


def _unlearn_node(graph: Graph, exp: ExperimentConfig, seed: int, recipe: Recipe,
                  starts: dict[str, StageNode], record: str) -> StageNode:
    params, method = unlearn_params(exp, recipe)
    start = starts[recipe.start]
    inputs = {"model": start.id}
    if "teacher" in method.needs():
        teacher = recipe.teacher or "oracle"
        if teacher not in starts:
            raise UndoError(f"recipe '{recipe.label}': method '{recipe.method}' needs a teacher model and the "
                            f"experiment has no '{teacher}'; add it to `models` or set the recipe's `teacher`")
        inputs["teacher"] = starts[teacher].id
    added: dict[str, StageNode] = {}
    for aux_name, spec in method.aux_models().items():
        after = getattr(spec, "after", None)  # a chain (SISA's slices): continue from an earlier aux model
        if after and after not in added:
            raise UndoError(f"method '{recipe.method}': auxiliary model '{aux_name}' continues '{after}', "
                            f"which it does not declare before it")
        added[aux_name] = _add_aux(graph, exp, seed, aux_name, spec, added[after] if after else start)
        inputs[f"aux:{aux_name}"] = added[aux_name].id
    return graph.add(StageNode(f"seed{seed}/unlearn/{recipe.label}", "unlearn", recipe.label, seed, params, inputs,
                               record=record))


def _add_aux(graph: Graph, exp: ExperimentConfig, seed: int, name: str, spec: Any, start: StageNode) -> StageNode:
    train = to_dict(from_dict(TrainConfig, {**to_dict(exp.pretrain), "checkpoint_every": 0, **spec.train},
                              f"auxiliary model {name}: train"))
    params = {"spec": {"start": spec.start, "data": spec.data, "shard": list(spec.shard) if spec.shard else None},
              "train": train, "task": to_dict(exp.task)}
    if getattr(spec, "lora", None):  # only when set: every other auxiliary model keeps its cache key
        params["spec"]["lora"] = list(spec.lora)
    if getattr(spec, "slice", None):  # likewise
        params["spec"]["slice"] = list(spec.slice)
    if getattr(spec, "quick_eval", False):  # likewise
        params["spec"]["quick_eval"] = True
    key = stage_key("aux", params, seed, {"model": start.key})
    node = StageNode(f"seed{seed}/aux/{name}-{key[:8]}", "aux", name, seed, params, {"model": start.id})
    return graph.add(node)


def _select_node(graph: Graph, seed: int, node_id: str, name: str, candidates: list[StageNode], start: StageNode,
                 tolerance: float, what: str, record: Optional[str], compute: str) -> StageNode:
    """`compute`: the candidates whose compute the choice inherits, "all" (a sweep) or "chosen"."""
    inputs = {f"c:{c.name}": c.id for c in candidates}
    inputs["start"] = start.id
    params = {"tolerance": tolerance, "what": what, "compute": compute}
    return graph.add(StageNode(node_id, "select", name, seed, params, inputs, record=record))


def _add_recipes(graph: Graph, exp: ExperimentConfig, seed: int,
                 starts: dict[str, StageNode]) -> dict[str, StageNode]:
    """One node per recipe (the selection of its sweep's winner when it has a sweep)."""
    out = {}
    for recipe in exp.unlearn.methods:
        record = "oracle_matching" if recipe.method in ORACLE_MATCHING_METHODS else "method"
        points = recipe.points(exp.unlearn.sweep)
        if len(points) == 1 and points[0] is recipe:
            out[recipe.label] = _unlearn_node(graph, exp, seed, recipe, starts, record)
            continue
        nodes = [_unlearn_node(graph, exp, seed, point, starts, "sweep") for point in points]
        out[recipe.label] = _select_node(graph, seed, f"seed{seed}/unlearn/{recipe.label}", recipe.label, nodes,
                                         starts[recipe.start], exp.unlearn.retain_tolerance,
                                         f"sweep winner of {recipe.label}", record, "all")
    return out


def _undo_teachers(exp: ExperimentConfig, seed: int, graph: Graph, starts: dict[str, StageNode],
                   recipes: dict[str, StageNode]) -> list[StageNode]:
    after = exp.undo.after
    methods = {name: node for name, node in recipes.items() if node.record == "method"}
    if after == "none" or not methods:
        return []
    if after == "all":
        return list(methods.values())
    if after == "auto":
        start = starts["base"]
        return [_select_node(graph, seed, f"seed{seed}/select/undo_teacher", "undo_teacher", list(methods.values()),
                             start, exp.unlearn.retain_tolerance, "UNDO teacher", None, "chosen")]
    unknown = [n for n in after if n not in recipes]
    if unknown:
        raise UndoError(f"undo.after: no recipe named {', '.join(unknown)}; recipes: {', '.join(recipes)}")
    return [recipes[n] for n in after]


def _add_undo(graph: Graph, exp: ExperimentConfig, seed: int, starts: dict[str, StageNode],
              recipes: dict[str, StageNode]) -> None:
    cfg = exp.undo
    teachers = _undo_teachers(exp, seed, graph, starts, recipes)
    for teacher in teachers:
        prefix = f"{teacher.name}-" if len(teachers) > 1 else ""
        students = []
        if cfg.unlearn_and_distill:
            steps = cfg.unlearn_and_distill_steps if cfg.unlearn_and_distill_steps is not None else cfg.distill.steps
            students.append(("unlearn_distill", "random", 0.0, steps, "unlearn_distill"))
        students += [(f"undo_a{a:g}", "noised", a, cfg.distill.steps, "undo") for a in cfg.alphas]
        for name, student, alpha, steps, record in students:
            params = distill_params(exp, student, alpha, steps)
            name = prefix + name
            graph.add(StageNode(f"seed{seed}/undo/{name}", "distill", name, seed, params, {"teacher": teacher.id},
                                record=record))


def _add_attacks(graph: Graph, exp: ExperimentConfig, seed: int) -> None:
    models = {n.name: n for n in graph.models(seed)}
    for spec in exp.attacks:
        attack = build_attack(spec.name, spec.options)
        targets = list(models) if spec.targets == "all" else spec.targets
        unknown = [t for t in targets if t not in models]
        if unknown:
            raise UndoError(f"attack '{spec.name}': no model named {', '.join(unknown)}; models: {', '.join(models)}")
        a_seeds = exp.attack_seeds if attack.seeded else exp.attack_seeds[:1]
        for target in targets:
            for point in attack.points():
                for a_seed in a_seeds:
                    params = attack_params(exp, attack, spec.name, point, a_seed)
                    node_id = f"seed{seed}/attack/{spec.name}/{target}/{attack.point_label(point)}-as{a_seed}"
                    inputs = {"target": models[target].id, **{r: models[r].id for r in attack.reads if r in models}}
                    graph.add(StageNode(node_id, "attack", target, seed, params, inputs))
