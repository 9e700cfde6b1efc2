"""EUL (Chen & Yang, EMNLP 2023, "Unlearn What You Want to Forget"): unlearning layers.

The base model stays frozen; only small adapters learn, one on each feed-forward block (the
"unlearning layers"), through `peft`. Loss, with F the frozen base and F' the model with its
adapters (the paper's selective teacher-student objective):

    L = a * KL(F || F')(retain) - KL(F || F')(forget) + l * CE(retain) + g * (-CE(forget))

a = 0.8, l = 1, g = 0.2, KL per scored position (masked mean). The paper trains on retain and
forget data in alternating epochs; so does this: a step is a retain step (a * KL + l * CE on a
retain batch) or a forget step (-KL - g * CE on a forget batch), in phases of one epoch of
each stream (`alternate_every` = 0) or of k steps each. The teacher F is the base itself with
the adapters switched off (no second copy in memory); its forward passes count as extra FLOPs.

The adapter. peft has no bottleneck ("Houlsby") adapter, so each unlearning layer is a LoRA
adapter on the MLP's output projection (down_proj; GPT-2: c_proj): the block then outputs
FFN(x) + (alpha / r) B A z, z the FFN's hidden activation. A linear adapter placed after the
FFN, h -> h + U D h, is this with A = D W_down. The paper's adapter has a nonlinearity between
D and U; it is dropped here, and with it gone (1) the adapter merges exactly into the weights,
so the unlearned checkpoint is a plain HF model that UNDO and every attack load, and (2) the
fusion below is the exact least-squares merge of whole unlearning layers, not a per-linear
approximation. During training the model is a `PeftModel`: its adapters save and load as peft
checkpoints (`save_pretrained`, `PeftModel.from_pretrained`); `merge_unlearning_layers` folds
them into the weights.

Fusion (`requests` = K > 1): K deletion requests = the task's forget examples cut into K
contiguous parts of its (seeded) order, one adapter each, trained in turn (each cycle: for
request i, a retain phase then a phase on forget part i, adapter i active). After training the
adapters are fused by the closed form W_m = (sum_i X_i^T X_i)^-1 sum_i X_i^T X_i W_i (W_i: adapter
i's map, X_i: its inputs on forget part i, with adapter i on), the W minimising
sum_i ||X_i W - X_i W_i||^2, and W_m is added to the base weights. Each X_i^T X_i is first shrunk
toward its diagonal (`fusion_shrink`, RegMean's regulariser): a few hundred forget tokens leave the
sum ill-conditioned, and the bare solve wrecks the model (facts-quick: model utility 0.76 -> 0.0).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Optional

import torch

from .. import arch
from ..data import BatchStream
from ..errors import UndoError
from ..losses import forward_kl, scored_positions
from ..metrics import masked_ce
from ..models import non_embedding_params
from ..training import LossOutput
from .base import Method, check_weights, logits_of

DATA_KEYS = ("input_ids", "attention_mask", "labels")


@dataclasses.dataclass
class EULOptions:
    retain_kl_weight: float = 0.8   # a: KL(F || F') on retain
    task_weight: float = 1.0        # l: CE on retain (the task loss)
    forget_lm_weight: float = 0.2   # g: the negated LM loss (CE) on forget
    rank: int = 8                   # adapter rank r
    lora_alpha: float = 16.0        # adapter scale alpha / r
    alternate_every: int = 0        # 0: alternate one epoch of retain and one of forget (the paper's); k: k steps each
    requests: int = 1               # K deletion requests: one adapter each, fused (1: no fusion)
    # fusion: each G_i = X_i^T X_i shrunk to (1 - s) G_i + s diag(G_i), RegMean's regulariser (Jin et al. 2023,
    # alpha = 1 - s = 0.9); 0: the bare closed form, which a few hundred tokens leave ill-conditioned
    fusion_shrink: float = 0.1

    def validate(self, where: str) -> None:
        check_weights(where, retain_kl_weight=self.retain_kl_weight, task_weight=self.task_weight,
                      forget_lm_weight=self.forget_lm_weight, alternate_every=self.alternate_every,
                      fusion_shrink=self.fusion_shrink)
        if self.rank < 1:
            raise UndoError(f"{where}.rank must be at least 1, got {self.rank}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise UndoError(f"{where}.lora_alpha must be a positive number, got {self.lora_alpha}")
        if self.fusion_shrink > 1:
            raise UndoError(f"{where}.fusion_shrink must be in [0, 1] (0: the bare closed form), got {self.fusion_shrink}")
        if self.requests < 1:
            raise UndoError(f"{where}.requests must be at least 1 (1: one adapter, no fusion), got {self.requests}")


# ---------------------------------------------------------------- the losses

def retain_step_loss(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor,
                     o: EULOptions) -> tuple[torch.Tensor, dict[str, float]]:
    """a * KL(F || F') + l * CE on a retain batch."""
    kl = forward_kl(base_logits, logits, scored_positions(labels))
    ce = masked_ce(logits, labels)
    return o.retain_kl_weight * kl + o.task_weight * ce, {"retain_kl": kl.item(), "retain_ce": ce.item()}


def forget_step_loss(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor,
                     o: EULOptions) -> tuple[torch.Tensor, dict[str, float]]:
    """-KL(F || F') - g * CE on a forget batch: move away from the base and from the data."""
    kl = forward_kl(base_logits, logits, scored_positions(labels))
    ce = masked_ce(logits, labels)
    return -kl - o.forget_lm_weight * ce, {"forget_kl": kl.item(), "forget_ce": ce.item()}


# ---------------------------------------------------------------- fusion's closed form

def fuse_linear_maps(grams: list[torch.Tensor], maps: list[torch.Tensor], shrink: float = 0.0) -> torch.Tensor:
    """W_m = (sum_i G_i)^-1 sum_i G_i W_i with G_i = X_i^T X_i [in, in] and W_i [in, out] (x -> x W_i):
    the map closest to each W_i on its own inputs, argmin_W sum_i ||X_i W - X_i W_i||^2. `shrink` = s > 0
    first replaces each G_i by (1 - s) G_i + s diag(G_i) (RegMean's): inputs of a few hundred tokens
    leave sum G_i near-singular, and the bare solve then blows up in its weakest directions."""
    if not grams or len(grams) != len(maps):
        raise UndoError(f"fusion needs one Gram matrix per map, got {len(grams)} and {len(maps)}")
    total, weighted = 0.0, 0.0
    for gram, w in zip(grams, maps):
        g = gram.double()
        g = (1 - shrink) * g + shrink * torch.diag(g.diagonal())
        total = total + g
        weighted = weighted + g @ w.double()
    return torch.linalg.solve(total, weighted).to(maps[0].dtype)


# ---------------------------------------------------------------- adapters (peft)

def adapter_name(request: int) -> str:
    return f"request{request}"


def add_unlearning_layers(model: torch.nn.Module, rank: int, alpha: float, requests: int = 1,
                          seed: int = 0) -> torch.nn.Module:
    """`model` as a `PeftModel` with `requests` LoRA adapters ("request0", ...) on every MLP output
    projection, base weights frozen; B = 0, so it computes what `model` did."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=[arch.spec(model).mlp_down])
    torch.manual_seed(seed)  # the adapters' A matrices
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config, adapter_name=adapter_name(0))
        for i in range(1, requests):
            peft_model.add_adapter(adapter_name(i), config)
    return peft_model


def adapted_layers(peft_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft LoRA layers (one per MLP output projection), in model order."""
    from peft.tuners.lora import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


def adapter_map(layer: torch.nn.Module, name: str) -> torch.Tensor:
    """Adapter `name`'s change to `layer` as a map x -> x W, W [in, out] (Conv1D stores that layout)."""
    delta = layer.get_delta_weight(name)
    return delta if layer.fan_in_fan_out else delta.T


@torch.no_grad()
def adapter_input_grams(peft_model: torch.nn.Module, name: str, rows: dict[str, torch.Tensor],
                        batch_size: int) -> list[torch.Tensor]:
    """X^T X [in, in] (float64) of each adapted layer's inputs over the real tokens of `rows`,
    adapter `name` active (each adapter's own inputs, as the closed form asks)."""
    layers = adapted_layers(peft_model)
    grams = [torch.zeros(0)] * len(layers)
    mask: list[torch.Tensor] = []

    def hook(index: int):
        def collect(module, inputs, output):
            x = inputs[0][mask[0]].double()  # [real tokens, in]
            g = x.T @ x
            grams[index] = g if grams[index].numel() == 0 else grams[index] + g
        return collect

    peft_model.set_adapter(name)
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    device = next(peft_model.parameters()).device
    try:
        for start in range(0, rows["input_ids"].shape[0], batch_size):
            batch = {k: rows[k][start:start + batch_size].to(device) for k in ("input_ids", "attention_mask")}
            mask[:] = [batch["attention_mask"].bool()]
            peft_model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return grams


@torch.no_grad()
def merge_unlearning_layers(peft_model: torch.nn.Module, grams: Optional[dict[str, list[torch.Tensor]]] = None,
                            shrink: float = 0.0) -> torch.nn.Module:
    """The plain model with its unlearning layers in the weights: one adapter merged as it is;
    several fused (`grams`: adapter name -> each adapted layer's X^T X on that adapter's forget data)
    by the closed form, W_m added to each projection."""
    names = list(peft_model.peft_config)
    if len(names) == 1 and grams is None:
        return peft_model.merge_and_unload()
    if grams is None or set(grams) != set(names):
        raise UndoError(f"fusing unlearning layers {names} needs the Gram matrices of each one's inputs; got "
                        f"{sorted(grams or {})}")
    fused = []
    for index, layer in enumerate(adapted_layers(peft_model)):
        w = fuse_linear_maps([grams[n][index] for n in names], [adapter_map(layer, n) for n in names], shrink)
        fused.append((layer.get_base_layer(), w if layer.fan_in_fan_out else w.T))
    model = peft_model.unload()  # the base layers back in place, unchanged
    for base_layer, delta in fused:
        base_layer.weight += delta.to(base_layer.weight.dtype)
    return model


# ---------------------------------------------------------------- alternating phases

class PhaseStream:
    """One batch per step from retain or from a forget part, in phases: each cycle, for each
    request i, a retain phase then a phase on forget part i. A phase is one epoch of its stream
    (`every` = 0) or `every` steps. Each batch carries [B, 1] columns "request" (whose adapter
    learns) and "forget" (1: a forget batch). Deterministic in the step (resume-safe)."""

    def __init__(self, retain: BatchStream, forget_parts: list[BatchStream], every: int):
        def length(stream: BatchStream) -> int:
            return every or math.ceil(stream.n / stream.batch_size)

        self.sources = [retain, *forget_parts]  # source 0: retain; 1 + i: forget part i
        self.cycle: list[tuple[int, int]] = []  # (source, request) per step of a cycle
        for i, part in enumerate(forget_parts):
            self.cycle += [(0, i)] * length(retain) + [(1 + i, i)] * length(part)
        self.per_cycle = [sum(s == k for s, _ in self.cycle) for k in range(len(self.sources))]
        seen = [0] * len(self.sources)
        self.use_index = []  # for each step of a cycle: how often its source was used before it in the cycle
        for source, _ in self.cycle:
            self.use_index.append(seen[source])
            seen[source] += 1

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        cycle, at = divmod(step, len(self.cycle))
        source, request = self.cycle[at]
        batch = self.sources[source].batch(cycle * self.per_cycle[source] + self.use_index[at])
        rows = batch["input_ids"].shape[0]
        return {**batch, "request": torch.full((rows, 1), request), "forget": torch.full((rows, 1), int(source > 0))}


def forget_parts(stream: BatchStream, requests: int) -> list[BatchStream]:
    """The forget stream's rows cut into `requests` contiguous parts (rows in the task's order)."""
    index = torch.arange(stream.n)
    return [BatchStream({k: v[part] for k, v in stream.rows.items()}, stream.batch_size, stream.seed + i, stream.bucket)
            for i, part in enumerate(index.tensor_split(requests))]


# ---------------------------------------------------------------- the method

class EUL(Method):
    name = "eul"
    description = "unlearning layers (peft adapters on each FFN, base frozen): selective teacher-student loss, fusion"
    Options = EULOptions
    train_defaults = dict(Method.train_defaults, lr=1e-3)  # adapters, from zero: a larger step than full finetuning
    forget_needs = frozenset({"forget", "retain"})  # the teacher is the base itself, adapters off

    def __init__(self, options: EULOptions, task: Optional[str] = None, seed: int = 0):
        super().__init__(options, task, seed)
        if options.requests > 1:  # one example per row: row i is forget example i, so parts are requests
            self.row_format = "padded"
        self.forget_examples = 0
        self.parts: list[BatchStream] = []
        self.fusion: dict[str, Any] = {}

    def bind_task(self, task, tokenizer) -> None:
        self.forget_examples = len(task.train_examples("forget"))

    def adapt(self, model):
        o = self.options
        return add_unlearning_layers(model, o.rank, o.lora_alpha, o.requests, self.seed + 11)

    def trainable_parameters(self, model):
        return [p for n, p in model.named_parameters() if "lora_" in n]

    def start(self, model, streams) -> None:
        o = self.options
        forget = streams.pop("forget")
        if o.requests > 1 and forget.n != self.forget_examples:
            raise UndoError(f"eul: {forget.n} forget rows but {self.forget_examples} forget examples; fusion needs "
                            f"one example per row, run it through the unlearn stage")
        if o.requests > forget.n:
            raise UndoError(f"eul: {o.requests} requests but only {forget.n} forget rows; use fewer requests")
        self.parts = forget_parts(forget, o.requests)
        streams["eul"] = PhaseStream(streams.pop("retain"), self.parts, o.alternate_every)

    def loss(self, model, batches) -> LossOutput:
        if "eul" not in batches:
            raise UndoError("eul: no alternating stream; run it through the unlearn stage (it calls start)")
        batch = batches["eul"]
        peft_model = arch.unwrap(model)
        if self.options.requests > 1:
            peft_model.set_adapter(adapter_name(int(batch["request"][0, 0])))
        data = {k: batch[k] for k in DATA_KEYS}
        logits = logits_of(model, data)
        with torch.no_grad(), peft_model.disable_adapter():
            base_logits = logits_of(peft_model, data)
        flops = 2.0 * non_embedding_params(peft_model) * data["input_ids"].numel()
        step_loss = forget_step_loss if bool(batch["forget"][0, 0]) else retain_step_loss
        loss, logs = step_loss(logits, base_logits, data["labels"], self.options)
        return LossOutput(loss, logs, flops)

    def export(self, model):
        o = self.options
        if o.requests == 1:
            return merge_unlearning_layers(model)
        grams, tokens = {}, 0
        for i, part in enumerate(self.parts):
            grams[adapter_name(i)] = adapter_input_grams(model, adapter_name(i), part.rows, part.batch_size)
            tokens += int(part.rows["attention_mask"].sum())
        # forward passes over every forget part (padding rows included), one per request
        self.fusion = {"flops": 2.0 * non_embedding_params(model) * sum(p.rows["input_ids"].numel() for p in self.parts),
                       "tokens": tokens, "requests": o.requests}
        return merge_unlearning_layers(model, grams, o.fusion_shrink)

    def report(self) -> dict[str, Any]:
        return dict(self.fusion)
