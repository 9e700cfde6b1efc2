"""Mechanistic unlearning (Guo et al. 2024): localise the components that look the facts up,
then train only them.

Localise (`locate`, before training, on up to `locate_rows` forget question/answer rows; a
component is one decoder layer's MLP, whose output is its write to the residual stream; m =
the answer tokens' summed log-odds log p - log(1 - p) given the question):
- `attribution` (attribution patching, Nanda 2023): the first-order estimate of how much m
  falls when the MLP's output a is mean-ablated, sum over real positions of (a - mean a) . dm/da,
  mean over rows (the mean is over the rows' real positions). One forward and one backward.
- `causal_tracing` (Meng et al. 2022): the question's token embeddings are noised (Gaussian,
  `noise` x the embedding matrix's std, seeded); the MLP's clean output is restored at every
  position; its score is the mean recovery of m over the noised run. One run per layer.
The `components` highest-scoring MLPs train. Same-budget baselines, options of the same method:
- `random`: `components` MLPs drawn at random (seeded): the same parameter count;
- `all_mlps` / `all` (non-localised): with `match_budget` (default), a seeded random subset of
  the weights of every MLP / of the whole model, as many as the localised MLPs hold, trains
  (the others' gradients are masked, and `finish` puts them back exactly); without it, every
  weight there trains.
Loss: L = L_forget + a * R, L_forget = -mean_rows log(1 - p(y)), p(y) = exp(log pi(y)) of each
forget example (one per row), R = CE (or KL to the reference) on the retain stream: on this
library's tasks the retain stream holds both the kept facts (L_maintain) and the general text
(L_lm), so the paper's two terms are one term here. Paper: AdamW, lr 1e-5, 50 steps (Gemma-7B);
its fact-lookup MLPs were found by hand (Gemma-7B: layers 2-7 of 28); `components` unset: a
fifth of the layers (at least 1). Inferred: restoring a layer at every position (Meng et al.
restore one position, or windows of layers), noising the whole question (no subject spans in
the task's rows), a mean-ablation baseline for attribution patching (no paired corrupt prompts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterator
from typing import Literal, Optional

import torch

from .. import arch, log
from ..data import IGNORE
from ..errors import UndoError
from ..losses import sequence_logprob
from ..metrics import model_device, token_logprobs
from ..models import non_embedding_params
from ..training import LossOutput
from .base import Batch, Method, RetainLoss, check_weights, forget_and_retain_logits, logits_of

Localize = Literal["attribution", "causal_tracing", "random", "all_mlps", "all"]


@dataclasses.dataclass
class MechanisticOptions:
    localize: Localize = "attribution"
    components: Optional[int] = None  # MLPs trained (default: a fifth of the layers, at least 1)
    match_budget: bool = True         # all_mlps / all: train only as many weights as the localised MLPs hold
    locate_rows: int = 64             # forget question/answer rows the localisation scores
    noise: float = 3.0                # causal tracing: embedding noise, x the embedding matrix's std
    retain_weight: float = 1.0        # a: L_maintain + L_lm (CE on the retain stream)
    retain_loss: RetainLoss = "nll"

    def validate(self, where: str) -> None:
        check_weights(where, retain_weight=self.retain_weight, noise=self.noise)
        if self.components is not None and self.components < 1:
            raise UndoError(f"{where}.components must be at least 1 (or unset for a fifth of the layers), "
                            f"got {self.components}")
        if self.locate_rows < 1:
            raise UndoError(f"{where}.locate_rows must be at least 1, got {self.locate_rows}")


def forget_loss(logp: torch.Tensor) -> torch.Tensor:
    """-mean log(1 - p), p = exp(logp) per row. log(1 - e^x) = log(-expm1(x)) is exact to float
    rounding for every x < 0; x is held below -1e-6 in value (p = 1 would give -log 0), not in
    gradient (a fact learnt to p > 0.999999 must still get one)."""
    safe = logp + (logp.clamp(max=-1e-6) - logp).detach()
    return -torch.log(-torch.expm1(safe)).mean()


def fact_rows(stream_rows: dict[str, torch.Tensor], limit: int) -> Batch:
    """The first `limit` rows that are question -> answer pairs (their first scored token comes
    after a prompt); all rows if none are (a task of plain text)."""
    labels = stream_rows["labels"]
    scored = labels != IGNORE
    first = torch.where(scored.any(1), scored.float().argmax(1), torch.zeros_like(labels[:, 0]))
    keep = (first > 1).nonzero().squeeze(1)
    keep = keep if len(keep) else torch.arange(len(labels))
    rows = {k: v[keep[:limit]] for k, v in stream_rows.items() if k in ("input_ids", "attention_mask", "labels")}
    width = int(rows["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in rows.items()}


@contextlib.contextmanager
def mlp_outputs_replaced(model: torch.nn.Module, replace: dict[int, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Within the block, layer l's MLP output is `replace[l](output)`."""
    handles = [arch.mlp(model, layer).register_forward_hook(lambda m, args, out, f=f: f(out))
               for layer, f in replace.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def answer_log_odds(model: torch.nn.Module, rows: Batch) -> torch.Tensor:
    """[B]: m, the answer tokens' summed log-odds log p - log(1 - p) given the question. Unlike
    log p it does not saturate on a fact learnt to p ~ 1 (its gradient there does not vanish)."""
    logp, mask = token_logprobs(logits_of(model, rows), rows["labels"])
    logp = logp.clamp(max=-1e-6)
    return ((logp - torch.log(-torch.expm1(logp))) * mask).sum(-1)


def attribution_scores(model: torch.nn.Module, rows: Batch) -> torch.Tensor:
    """[layers]: the attribution-patching estimate of the drop of mean m when each layer's MLP
    output is mean-ablated: -mean_rows sum_t (mean a - a_t) . dm/da_t (real positions only)."""
    n = arch.num_layers(model)
    real = rows["attention_mask"].unsqueeze(-1).float()
    outputs: dict[int, torch.Tensor] = {}
    probes = {}

    def tap(layer: int):
        def f(out: torch.Tensor) -> torch.Tensor:
            outputs[layer] = out.detach()
            probes[layer] = torch.zeros_like(out, requires_grad=True)  # d m / d probe = d m / d a (all paths)
            return out + probes[layer]
        return f

    with mlp_outputs_replaced(model, {layer: tap(layer) for layer in range(n)}):
        m = answer_log_odds(model, rows)
    grads = torch.autograd.grad(m.sum(), [probes[layer] for layer in range(n)])
    scores = []
    for layer, grad in enumerate(grads):
        a = outputs[layer].float()
        mean = (a * real).sum((0, 1)) / real.sum()
        change = ((mean - a) * grad.float() * real).sum((1, 2))  # per row: first-order change of m
        scores.append(-change.mean())
    return torch.stack(scores)


def noised_embeddings(model: torch.nn.Module, where: torch.Tensor, scale: float, generator: torch.Generator):
    """A forward hook on the input embeddings adding N(0, scale^2) noise at the positions `where` [B, T]."""
    def add(module, args, out):
        noise = torch.randn(out.shape, generator=generator).to(out.device, out.dtype) * scale
        return out + noise * where.unsqueeze(-1).to(out.dtype)
    return arch.unwrap(model).get_input_embeddings().register_forward_hook(add)


@torch.no_grad()
def causal_tracing_scores(model: torch.nn.Module, rows: Batch, noise: float, seed: int) -> torch.Tensor:
    """[layers]: the mean drop of m when one layer's MLP output (at every position) is the one it
    gives when the question's token embeddings are noised, everything else clean (the noising
    form of causal tracing: which component the answer cannot do without)."""
    n = arch.num_layers(model)
    noised: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def f(out):
            noised[layer] = out
            return out
        return f

    prompt = rows["attention_mask"].bool() & (rows["labels"] == IGNORE)  # the question: real, unscored tokens
    prompt[:, 0] = False  # but not BOS
    scale = noise * float(arch.unwrap(model).get_input_embeddings().weight.float().std())
    handle = noised_embeddings(model, prompt, scale, torch.Generator().manual_seed(seed))
    try:
        with mlp_outputs_replaced(model, {layer: keep(layer) for layer in range(n)}):
            answer_log_odds(model, rows)
    finally:
        handle.remove()
    clean = answer_log_odds(model, rows)
    patched = []
    for layer in range(n):
        with mlp_outputs_replaced(model, {layer: lambda out, c=noised[layer]: c}):
            patched.append((clean - answer_log_odds(model, rows)).mean())
    return torch.stack(patched)


def budget_masks(params: list[torch.nn.Parameter], budget: int, seed: int) -> list[torch.Tensor]:
    """Bool masks over `params` with `budget` True entries in all, drawn uniformly at random
    (seeded): each tensor gets its share of the budget by size (largest remainders), then a
    random subset of its entries."""
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    if budget > total:
        raise UndoError(f"mechanistic: the budget ({budget} weights) exceeds the {total} weights it is drawn from")
    exact = [budget * s / total for s in sizes]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: exact[i] - shares[i], reverse=True)[:budget - sum(shares)]:
        shares[i] += 1
    g = torch.Generator().manual_seed(seed)
    masks = []
    for p, share in zip(params, shares):
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        mask[torch.randperm(p.numel(), generator=g)[:share]] = True
        masks.append(mask.view(p.shape).to(p.device))
    return masks


def unique_parameters(modules: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class Mechanistic(Method):
    name = "mechanistic"
    description = "train only localised fact-lookup MLPs (or same-budget baselines): -log(1 - p(answer)) + retain"
    Options = MechanisticOptions
    train_defaults = dict(Method.train_defaults, steps=50, lr=1e-5)
    row_format = "padded"

    def __init__(self, options, task=None, seed=0):
        super().__init__(options, task, seed)
        self.layers: list[int] = []               # the MLPs that train (localised or random)
        self.scores: list[float] = []             # the localisation's score per layer
        self.masks: dict[int, torch.Tensor] = {}  # id(param) -> the weights that train (budget-matched baselines)
        self.budget = 0
        self.locate_flops = 0.0
        self._hooks: list = []
        self._start_values: dict[int, torch.Tensor] = {}

    def components(self, model) -> int:
        n = arch.num_layers(model)
        k = self.options.components if self.options.components is not None else max(1, round(n / 5))
        if k > n:
            raise UndoError(f"mechanistic.components: {k} MLPs asked for, but the model has {n} layers; use at most {n}")
        return k

    def locate(self, model, streams) -> None:
        o, k, n = self.options, self.components(model), arch.num_layers(model)
        rows = {key: v.to(model_device(model)) for key, v in fact_rows(streams["forget"].rows, o.locate_rows).items()}
        tokens, n_params = rows["input_ids"].numel(), non_embedding_params(arch.unwrap(model))
        was_training = model.training
        model.eval()  # no dropout in the measurements
        if o.localize == "attribution":
            scores = attribution_scores(model, rows)
            self.locate_flops = 6.0 * n_params * tokens
        elif o.localize == "causal_tracing":
            scores = causal_tracing_scores(model, rows, o.noise, self.seed)
            self.locate_flops = 2.0 * n_params * tokens * (n + 2)
        else:
            scores = torch.zeros(n)
        model.train(was_training)
        self.scores = [float(s) for s in scores]
        if o.localize in ("attribution", "causal_tracing"):
            self.layers = sorted(sorted(range(n), key=lambda layer: (-self.scores[layer], layer))[:k])
        elif o.localize == "random":
            self.layers = sorted(random.Random(f"{self.seed}-mechanistic").sample(range(n), k))
        mlp_size = sum(p.numel() for p in arch.mlp(model, 0).parameters())
        self.budget = k * mlp_size
        if o.localize in ("all_mlps", "all") and o.match_budget:
            params = self.trainable_parameters(model)
            self.masks = {id(p): m for p, m in zip(params, budget_masks(params, self.budget, self.seed))}
        elif o.localize in ("all_mlps", "all"):
            self.budget = sum(p.numel() for p in self.trainable_parameters(model))
        log.say(f"mechanistic ({o.localize}): training {self.budget} weights"
                + (f", MLPs of layers {self.layers}" if self.layers else "")
                + (f"; scores per layer {[round(s, 3) for s in self.scores]}" if any(self.scores) else ""))

    def trainable_parameters(self, model):
        o = self.options
        if o.localize == "all":
            return unique_parameters([model])
        layers = range(arch.num_layers(model)) if o.localize == "all_mlps" else self.layers
        if not layers:
            raise UndoError("mechanistic: no components located yet; the unlearn stage calls locate(model, streams) "
                            "before trainable_parameters")
        return unique_parameters([arch.mlp(model, layer) for layer in layers])

    def start(self, model, streams) -> None:
        """Budget-matched baselines: gradients outside the drawn weights are zeroed, and those
        weights' starting values kept, so that `finish` can put them back whatever the optimiser did."""
        for p in self.trainable_parameters(model):
            mask = self.masks.get(id(p))
            if mask is not None:
                self._start_values[id(p)] = p.detach().clone()
                self._hooks.append(p.register_hook(lambda g, m=mask: g * m.to(g.dtype)))

    def finish(self, model, streams) -> None:
        for handle in self._hooks:
            handle.remove()
        for p in self.trainable_parameters(model):
            if id(p) in self._start_values:
                p.copy_(torch.where(self.masks[id(p)], p, self._start_values.pop(id(p))))

    def report(self) -> dict:
        return {"flops": self.locate_flops, "components": self.layers, "scores": self.scores,
                "trained_weights": self.budget}

    def loss(self, model, batches) -> LossOutput:
        forget = batches["forget"]
        forget_logits, retain_logits = forget_and_retain_logits(self, model, batches)
        logp = sequence_logprob(forget_logits, forget["labels"])
        loss = forget_loss(logp)
        out = LossOutput(loss, {"forget_loss": loss.item(), "forget_p": logp.exp().mean().item()})
        return self.with_retain(model, batches, out, retain_logits)
