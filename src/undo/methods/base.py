"""The method interface and registry.

A method is a small class: a `name`, a one-line `description`, an `Options` dataclass
of hyperparameters (reference defaults; `task_defaults[task]` overrides them where the
paper used other values for a task), `train_defaults` (TrainConfig fields: steps, lr,
...; `Method` holds the common ones, a method states only what differs), what it
`needs()` (a subset of NEEDS), and `loss(model, batches)`; optionally `start` /
`finish` to look at or edit the weights around training, `locate` to choose what trains
from the data. The unlearn stage (stage.py) does everything else: it loads frozen models
only when `needs()` names them and hands them over with `attach`, builds the data streams,
and runs the one training loop with `loss` as its loss function.

Batches are {"forget": batch, "retain": batch, "idk": batch}, each a dict of
input_ids / attention_mask / labels (labels = -100 where no loss falls), packed (many
examples per row) unless the method sets `row_format = "padded"` (one example per row,
for sequence-level losses such as NPO and DPO). Frozen models run under no_grad and
their forward passes are reported as `extra_flops` (2 x params x tokens).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, Callable, ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..config import from_dict
from ..errors import UndoError
from ..registry import Registry
from ..losses import forward_kl, scored_positions
from ..metrics import masked_ce
from ..models import non_embedding_params
from ..training import LossOutput

Batch = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class AuxModel:
    """An auxiliary model a method asks for: trained by the engine as a stage of its own."""

    start: Literal["input", "random"] = "input"   # continue from the model being unlearned, or from scratch
    # old: the facts a knowledge update replaces; extra: the task's data disjoint from all training data (KGA)
    data: Literal["forget", "retain", "all", "old", "extra"] = "forget"
    shard: Optional[tuple[int, int]] = None       # (index, count): one of `count` disjoint shards of the data
    train: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig over the experiment's pretrain
    lora: Optional[tuple[int, float]] = None      # (rank, alpha): train LoRA adapters (peft), merged; None: every weight
    slice: Optional[tuple[int, int]] = None       # (index, count): slices 0..index of the shard's `count` slices (SISA)
    after: Optional[str] = None                   # continue from this auxiliary model of the method, declared before
    quick_eval: bool = False                      # evaluate it on the task's quick subset (SISA: S x R of them)

    def __post_init__(self) -> None:
        if self.after and self.start != "input":  # a chain: slice r's model continues slice r-1's
            raise UndoError(f"auxiliary model after '{self.after}': a model that continues another needs start 'input'")

    def __hash__(self) -> int:
        return hash((self.start, self.data, self.shard, tuple(sorted(self.train.items())), self.lora,
                     self.slice, self.after, self.quick_eval))


# spans: forget rows + a sensitive-token mask; update: the task's updated facts (knowledge editing);
# extra: the task's data disjoint from all training data (KGA's D_n);
# contrast: each forget example's contrast (the same sentence with the other group: PCGU), row for row;
# prompts: the task's prompts and reward, from which the method samples its own data (Quark's `own_streams`)
NEEDS = ("forget", "retain", "reference", "teacher", "idk", "spans", "update", "extra", "contrast", "prompts")
RowFormat = Literal["packed", "padded"]
RetainLoss = Literal["nll", "kl"]

# name -> "module:Class", imported when used. Adding a method: one file + one line here.
_REGISTRY = Registry("method", "undo methods", {
    "grad_ascent": "undo.methods.grad_ascent:GradAscent",
    "graddiff": "undo.methods.graddiff:GradDiff",
    "maxent": "undo.methods.maxent:MaxEnt",
    "rmu": "undo.methods.rmu:RMU",
    "npo": "undo.methods.npo:NPO",
    "simnpo": "undo.methods.simnpo:SimNPO",
    "idkdpo": "undo.methods.idkdpo:IdkDPO",
    "undial": "undo.methods.undial:UNDIAL",
    "sam": "undo.methods.sam:SAM",
    "repnoise": "undo.methods.repnoise:RepNoise",
    "oracle_matching": "undo.methods.oracle_matching:OracleMatching",
    "task_vector": "undo.methods.task_vector:TaskVector",
    "knowledge_unlearning": "undo.methods.knowledge_unlearning:KnowledgeUnlearning",
    "selective_forgetting": "undo.methods.selective_forgetting:SelectiveForgetting",
    "llmu": "undo.methods.llmu:LLMU",
    "sisa": "undo.methods.sisa:SISA",
    "fairsisa": "undo.methods.fairsisa:FairSISA",
    "whp": "undo.methods.whp:WHP",
    "kga": "undo.methods.kga:KGA",
    "depn": "undo.methods.depn:DEPN",
    "loo_ensemble": "undo.methods.loo_ensemble:LOOEnsemble",
    "f_learning": "undo.methods.f_learning:FLearning",
    "adv_ga": "undo.methods.adv_ga:AdvGA",
    "adv_npo": "undo.methods.adv_npo:AdvNPO",
    "mechanistic": "undo.methods.mechanistic:Mechanistic",
    "pcgu": "undo.methods.pcgu:PCGU",
    "eul": "undo.methods.eul:EUL",
    "quark": "undo.methods.quark:Quark",
})


class Method(abc.ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type]
    task_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # TrainConfig fields most methods train with; a method that differs states only the
    # difference: train_defaults = dict(Method.train_defaults, steps=100, lr=1e-3)
    train_defaults: ClassVar[dict[str, Any]] = dict(steps=30, lr=3e-4, batch_size=16, schedule="constant",
                                                    warmup_steps=0)
    row_format: ClassVar[RowFormat] = "packed"
    # What the forget loss itself needs; the retain term's needs are added from the options.
    forget_needs: ClassVar[frozenset[str]] = frozenset({"forget"})

    def __init__(self, options: Any, task: Optional[str] = None, seed: int = 0):
        self.options = options
        self.task = task
        self.seed = seed
        self.reference: Optional[PreTrainedModel] = None
        self.teacher: Optional[PreTrainedModel] = None
        self.aux: dict[str, PreTrainedModel] = {}

    def needs(self) -> frozenset[str]:
        """What the stage must supply (data streams and frozen models): the forget loss's needs,
        plus the retain term's for methods whose options have retain_weight/retain_loss."""
        o = self.options
        if hasattr(o, "retain_weight") and hasattr(o, "retain_loss"):
            return self.forget_needs | retain_needs(o.retain_loss, o.retain_weight)
        return self.forget_needs

    def attach(self, reference: Optional[PreTrainedModel] = None, teacher: Optional[PreTrainedModel] = None,
               aux: Optional[dict[str, PreTrainedModel]] = None) -> None:
        """Receive the frozen models named by `needs()` and the auxiliary models named by
        `aux_models()`, and only those."""
        for what, model in (("reference", reference), ("teacher", teacher)):
            if (model is not None) != (what in self.needs()):
                state = "needs" if model is None else "does not use"
                raise UndoError(f"method '{self.name}' {state} a {what} model; "
                                f"the stage must pass exactly what needs() names")
        if set(aux or {}) != set(self.aux_models()):
            raise UndoError(f"method '{self.name}' declares auxiliary models {sorted(self.aux_models())} "
                            f"but was given {sorted(aux or {})}")
        self.reference, self.teacher, self.aux = reference, teacher, dict(aux or {})

    def aux_models(self) -> dict[str, "AuxModel"]:
        """Auxiliary models the engine trains and caches before this method runs (a reinforced
        model, models on disjoint shards, ...), by name; they arrive frozen in `self.aux`."""
        return {}

    def prepare(self, model: PreTrainedModel) -> None:
        """Check options against the model (e.g. layer indices) before training."""

    def bind_task(self, task: Any, tokenizer: Any) -> None:
        """Before the data streams are built: the task and tokenizer, for a method that must relate
        forget rows to the task's examples (leave-one-out: which shard model saw each). Default: nothing."""

    def own_streams(self, cfg: Any, seed: int) -> dict:
        """Data streams the method builds itself, beside those `needs()` names, by name: anything with
        `batch(step)` giving the step's global batch (Quark: a pool it fills by sampling from the model
        as it trains, handed over in `start`). After `bind_task`. Default: none."""
        return {}

    def locate(self, model: torch.nn.Module, streams: dict) -> None:
        """Before `trainable_parameters`, on the starting model (gradients on) and the run's data
        streams: find what to train (mechanistic unlearning localises the components it trains).
        Default: nothing."""

    def adapt(self, model: PreTrainedModel) -> torch.nn.Module:
        """The module to train: the model itself, or the model with added modules (peft
        adapters) whose parameters `trainable_parameters` returns."""
        return model

    def export(self, model: torch.nn.Module) -> PreTrainedModel:
        """The model to evaluate and save after training (e.g. adapters merged into the weights)."""
        return model

    def report(self) -> dict[str, Any]:
        """After `export`: what the method adds to the stage's result.json ("method_report"); its
        "flops", "tokens" and "steps" (work outside the stage's loop, e.g. SISA's shard retraining)
        are added to the stage's own, and its "metrics" to the model's (SISA's deletion_cost). Default: nothing."""
        return {}

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return list(model.parameters())

    def start(self, model: torch.nn.Module, streams: dict) -> None:
        """Before training, on the starting weights (e.g. keep a copy of them)."""

    def finish(self, model: torch.nn.Module, streams: dict) -> None:
        """After training, before evaluation and saving: edit the weights directly (a method
        that only edits, e.g. zeroing neurons found on forget batches, trains 0 steps)."""

    def step_hook(self) -> Optional[Callable]:
        """A `train(step_hook=...)` replacement for the plain backward (SAM); None: plain."""
        return None

    def stop_after_step(self, logs: dict[str, float]) -> bool:
        """The method's own stop rule, after every training step on that step's `loss` logs:
        True ends training there (e.g. LLMU once the forget loss passes its bound). Default: never."""
        return False

    def stop_on_eval(self, metrics: dict[str, float]) -> bool:
        """The method's stop rule on the task's quick evaluation, every `eval_every` steps (and
        before the first): True ends training there (e.g. Knowledge Unlearning once the forget
        set's memorisation is below the unseen level). Default: never."""
        return False

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batches: dict[str, Batch]) -> LossOutput:
        """The method's loss on one step's batches ({"forget": ..., "retain": ...})."""

    def with_retain(self, model: torch.nn.Module, batches: dict[str, Batch], out: LossOutput,
                    retain_logits: Optional[torch.Tensor] = None) -> LossOutput:
        """`out` plus the options' retain term: retain_weight * (CE or KL to the reference) on retain
        data (`retain_logits`: the model's on the retain batch, if the method has them already)."""
        o = self.options
        if not o.retain_weight:
            return out
        retain, logs, flops = retain_term(o.retain_loss, model, batches["retain"], self.reference, retain_logits)
        return LossOutput(out.loss + o.retain_weight * retain, {**out.logs, **logs}, out.extra_flops + flops)


# ---------------------------------------------------------------- registry

def known_methods() -> list[str]:
    return list(_REGISTRY)


def register_method(name: str, target: "str | type[Method]") -> None:
    """Add a method from outside the package ("module:Class" or the class itself); the engine
    needs no change to run it."""
    _REGISTRY.register(name, target)


def method_class(name: str) -> type[Method]:
    return _REGISTRY.get_class(name)


def resolve_options(name: str, options: Optional[dict[str, Any]] = None, task: Optional[str] = None) -> Any:
    """The method's Options: class defaults < the task's defaults < `options`; validated."""
    cls = method_class(name)
    merged = {**cls.task_defaults.get(task or "", {}), **(options or {})}
    return from_dict(cls.Options, merged, f"method '{name}' options")


def build_method(name: str, options: Optional[dict[str, Any]] = None, task: Optional[str] = None,
                 seed: int = 0) -> Method:
    return method_class(name)(resolve_options(name, options, task), task=task, seed=seed)


# ---------------------------------------------------------------- helpers shared by methods

def logits_of(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# One forward for several batches (forget + retain, ...) by device kind. On an accelerator one
# launch of a bigger batch beats several small ones; on CPU the gain is ~1% of a step, and
# the weight gradients' float summation order (hence every cached CPU result) would change.
JOINT_FORWARD = {"cpu": False}
MAX_JOINT_PADDING = 0.25  # join only when right-padding to a common width adds at most this share


def logits_of_each(model: torch.nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """`logits_of` of each batch. Where JOINT_FORWARD allows (and the widths are close), in one
    forward over all their rows, the narrower batches right-padded to the widest; each batch
    gets its own rows and width back. Exact: under causal attention a real position sees
    neither the other rows nor the padding after it. Only float summation order differs
    (weight gradients summed over all rows at once), as between two batch sizes."""
    widths = [b["input_ids"].shape[1] for b in batches]
    width, rows = max(widths), [b["input_ids"].shape[0] for b in batches]
    tokens = sum(n * w for n, w in zip(rows, widths))
    device = batches[0]["input_ids"].device
    if (len(batches) < 2 or not JOINT_FORWARD.get(device.type, True)
            or width * sum(rows) > (1 + MAX_JOINT_PADDING) * tokens):
        return [logits_of(model, b) for b in batches]
    ids = torch.cat([F.pad(b["input_ids"], (0, width - w)) for b, w in zip(batches, widths)])
    mask = torch.cat([F.pad(b["attention_mask"], (0, width - w)) for b, w in zip(batches, widths)])
    logits = model(input_ids=ids, attention_mask=mask).logits
    return [part[:, :w] for part, w in zip(logits.split(rows), widths)]


def forget_and_retain_logits(method: "Method", model: torch.nn.Module,
                             batches: dict[str, Batch]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The model's logits on the forget batch and, when the options' retain term uses them
    (retain_weight > 0), on the retain batch, in one forward where `logits_of_each` joins them."""
    if not getattr(method.options, "retain_weight", 0):
        return logits_of(model, batches["forget"]), None
    forget_logits, retain_logits = logits_of_each(model, [batches["forget"], batches["retain"]])
    return forget_logits, retain_logits


def ce_of(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of `model` on a batch's scored tokens."""
    return masked_ce(logits_of(model, batch), batch["labels"])


def frozen_logits(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, float]:
    """Logits of a frozen model (no graph) and the FLOPs of that forward pass."""
    with torch.no_grad():
        logits = logits_of(model, batch)
    return logits, 2.0 * non_embedding_params(model) * batch["input_ids"].numel()


def frozen_logits_of_each(model: PreTrainedModel, batches: Sequence[Batch]) -> tuple[list[torch.Tensor], float]:
    """`frozen_logits` of each batch, joined into one forward as `logits_of_each` does."""
    with torch.no_grad():
        logits = logits_of_each(model, batches)
    return logits, 2.0 * non_embedding_params(model) * sum(b["input_ids"].numel() for b in batches)


def retain_term(kind: RetainLoss, model: torch.nn.Module, batch: Batch, reference: Optional[PreTrainedModel],
                logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float], float]:
    """The retain loss most methods add: "nll" = CE on retain data; "kl" = KL(p_ref || p)
    on the retain batch's scored positions (needs the reference). One forward per model
    (`logits`: the model's, when the method has them already). Returns (loss, logs, extra_flops)."""
    logits = logits_of(model, batch) if logits is None else logits
    ce = masked_ce(logits, batch["labels"])
    if kind == "nll":
        return ce, {"retain_ce": ce.item()}, 0.0
    assert reference is not None, "retain_loss='kl' needs the reference model (needs() says so)"
    ref_logits, flops = frozen_logits(reference, batch)
    kl = forward_kl(ref_logits, logits, scored_positions(batch["labels"]))
    return kl, {"retain_kl": kl.item(), "retain_ce": ce.item()}, flops


def retain_needs(kind: RetainLoss, weight: float) -> frozenset[str]:
    if weight == 0:
        return frozenset()
    return frozenset({"retain", "reference"}) if kind == "kl" else frozenset({"retain"})


def check_weights(where: str, **weights: float) -> None:
    for key, value in weights.items():
        if value < 0:
            raise UndoError(f"{where}.{key} must be >= 0, got {value}")
