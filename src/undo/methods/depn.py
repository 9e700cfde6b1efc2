"""DEPN (Wu et al., EMNLP 2023): detect the MLP neurons behind private tokens and zero them.

Detect. For each sensitive token x_t of each distinct forget document (the task's marked spans),
at the position t-1 that predicts it, and for each layer l on its own, the integrated gradient
of P(x_t | x_<t) with respect to each MLP neuron's activation a_i (the input of the layer's
down projection at that position), from a zero baseline in m steps:

    IG_i = a_i * (1/m) sum_{k=1..m} dP(x_t | a_l <- (k/m) a_l) / da_i

The token keeps the neurons with IG_i >= threshold x (its max IG over every layer's neurons)
(`threshold_on: document`: the IGs are summed over the document's sensitive tokens first, as
the authors' code does). Aggregate: a neuron counts once per document that keeps it; the
`neurons` most frequent are erased (ties: the larger attribution summed over every token).
Edit: the neuron's column of the down projection (its row for GPT-2's Conv1D) is zeroed, so
its output is 0 whatever its activation, and the saved checkpoint carries the edit.
No training (0 steps): everything happens in `finish`. The paper works on BERT (masked
tokens); here the attributed prediction is the next token of a causal LM. The paper's
sum is over k = 1..m (the authors' code takes k = 0..m-1); this follows the paper. On
Gemma-2/3 the MLP output passes a post-norm that undoes a common scale, so P is flat along
(k/m) a for k > 0: the IGs there do not sum to P(a) - P(0) (they still rank neurons).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from .. import arch, log
from ..data import IGNORE
from ..errors import UndoError
from ..metrics import model_device
from ..models import non_embedding_params
from ..training import LossOutput
from .base import Method
from .knowledge_unlearning import distinct_rows

Neuron = tuple[int, int]  # (layer, index in the MLP's intermediate dimension)


@dataclasses.dataclass
class DEPNOptions:
    ig_steps: int = 20                 # m, integration steps
    threshold: float = 0.1             # keep neurons with IG >= threshold x the max IG
    threshold_on: Literal["token", "document"] = "token"
    neurons: int = 20                  # erase this many of the most frequent (the authors' editing script)
    fraction: float = 0.0              # > 0: erase this share of all MLP neurons instead of `neurons`
    attribution_batch: int = 256       # rows per forward pass while attributing (memory only)

    def validate(self, where: str) -> None:
        for name in ("ig_steps", "neurons", "attribution_batch"):
            if getattr(self, name) < 1:
                raise UndoError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.threshold <= 1:
            raise UndoError(f"{where}.threshold must be in (0, 1] (a share of the max attribution), "
                            f"got {self.threshold}")
        if not 0 <= self.fraction < 1:
            raise UndoError(f"{where}.fraction must be in [0, 1) (0: erase `neurons` instead), got {self.fraction}")


def integrated_gradients(prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], activation: torch.Tensor,
                         steps: int, batch: int) -> torch.Tensor:
    """IG_i = a_i * (1/m) sum_{k=1..m} dP((k/m) a)/da_i for each of n activations a ([n, d]).
    `prob(points, index)`: P at the scaled activations `points` [r, d] of activations `index` [r],
    one value per row ([r]); called on at most `batch` rows at a time."""
    n, d = activation.shape
    alphas = torch.arange(1, steps + 1, dtype=activation.dtype, device=activation.device) / steps
    points = (alphas[None, :, None] * activation.detach()[:, None, :]).reshape(n * steps, d)
    index = torch.arange(n, device=activation.device).repeat_interleave(steps)
    grads = []
    for s in range(0, n * steps, batch):
        x = points[s:s + batch].clone().requires_grad_(True)
        grads.append(torch.autograd.grad(prob(x, index[s:s + batch]).sum(), x)[0])
    return activation.detach() * torch.cat(grads).view(n, steps, d).mean(1)


def down_projection(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The layer's MLP down projection, whose input holds the MLP's neuron activations."""
    from transformers.pytorch_utils import Conv1D

    module = arch.mlp_down(model, layer)  # an architecture not in undo's table fails there, by name
    if not isinstance(module, (torch.nn.Linear, Conv1D)):
        raise UndoError(f"depn: the MLP down projection of architecture '{arch.unwrap(model).config.model_type}' "
                        f"is a {type(module).__name__}, not nn.Linear or Conv1D; DEPN cannot zero its neurons")
    return module


def mlp_activations(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's MLP neuron activations ([rows, T, d_ff] each) from one forward pass."""
    captured: list[torch.Tensor] = []
    hooks = [down_projection(model, layer).register_forward_pre_hook(lambda m, args: captured.append(args[0]))
             for layer in range(arch.num_layers(model))]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured


@contextlib.contextmanager
def replaced_activation(model: torch.nn.Module, layer: int, positions: torch.Tensor,
                        values: torch.Tensor) -> Iterator[None]:
    """Within the block, row r's layer-`layer` MLP activation at `positions[r]` is `values[r]`."""
    rows = torch.arange(len(positions), device=positions.device)

    def replace(module, args):
        return (args[0].index_put((rows, positions), values.to(args[0].dtype)),) + tuple(args[1:])

    handle = down_projection(model, layer).register_forward_pre_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def token_attributions(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor, steps: int,
                       batch: int) -> torch.Tensor:
    """[n, layers, d_ff]: each layer's IG for each sensitive token `targets` (indices into the
    one row `ids` [T]; the prediction of token t is made at t - 1)."""
    positions, gold = targets - 1, ids[targets]
    ids = ids[:int(targets.max()) + 1][None]  # causal: later tokens change nothing
    mask = torch.ones_like(ids)
    acts = mlp_activations(model, ids, mask)
    per_layer = [integrated_gradients(gold_prob(model, layer, ids, positions, gold), act[0, positions], steps, batch)
                 for layer, act in enumerate(acts)]
    return torch.stack(per_layer, 1)


def gold_prob(model: torch.nn.Module, layer: int, ids: torch.Tensor, positions: torch.Tensor,
              gold: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`prob(x, index)` for `integrated_gradients`: P(gold[index] | the row `ids` [1, T] with
    layer `layer`'s activation at positions[index] set to x), one forward over len(x) copies."""
    def prob(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        pos, rows = positions[index], torch.arange(len(x), device=x.device)
        with replaced_activation(model, layer, pos, x):
            logits = model(input_ids=ids.expand(len(x), -1), use_cache=False).logits
        return logits[rows, pos].float().softmax(-1)[rows, gold[index]]
    return prob


def kept_neurons(scores: torch.Tensor, threshold: float, on: Literal["token", "document"]) -> torch.Tensor:
    """[layers, d_ff] bool: the neurons one document keeps, from its tokens' IG `scores` [n, layers, d_ff]."""
    if on == "document":
        scores = scores.sum(0, keepdim=True)
    top = scores.flatten(1).max(1).values[:, None, None]
    return ((scores >= threshold * top) & (top > 0)).any(0)  # a token with no positive IG keeps none


def most_frequent(counts: torch.Tensor, totals: torch.Tensor, k: int) -> list[Neuron]:
    """The k neurons kept by most documents (ties: larger summed IG, then lower layer and index)."""
    candidates = [(int(l), int(i)) for l, i in counts.nonzero().tolist()]
    candidates.sort(key=lambda n: (-int(counts[n]), -float(totals[n]), n))
    return candidates[:k]


def zero_neurons(model: torch.nn.Module, neurons: list[Neuron]) -> None:
    """Zero each neuron's weights in its layer's down projection: its output is 0 from now on."""
    for layer, index in neurons:
        down = down_projection(model, layer)
        with torch.no_grad():
            if isinstance(down, torch.nn.Linear):  # weight [out, in]
                down.weight[:, index] = 0.0
            else:                                  # GPT-2's Conv1D: weight [in, out]
                down.weight[index, :] = 0.0


class DEPN(Method):
    name = "depn"
    description = "zero the MLP neurons whose integrated gradients explain the private tokens (no training)"
    Options = DEPNOptions
    train_defaults = dict(Method.train_defaults, steps=0)
    row_format = "padded"
    forget_needs = frozenset({"forget", "spans"})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.erased: list[Neuron] = []
        self.attribution_flops = 0.0  # an estimate, reported through `report` (the loop trains 0 steps)

    def loss(self, model, batches) -> LossOutput:
        raise UndoError("depn edits the weights without training; set train.steps to 0")

    def finish(self, model, streams) -> None:
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                counts, totals, docs, tokens = self.attribute(model, distinct_rows(streams["forget"]).rows)
        finally:
            model.train(was_training)
        k = math.ceil(self.options.fraction * counts.numel()) if self.options.fraction else self.options.neurons
        self.erased = most_frequent(counts, totals, k)
        zero_neurons(model, self.erased)
        layers = [sum(1 for l, _ in self.erased if l == layer) for layer in range(counts.shape[0])]
        log.say(f"depn: zeroed {len(self.erased)} MLP neurons (per layer {layers}) of {int((counts > 0).sum())} "
                f"kept by {docs} forget documents ({tokens} sensitive tokens; attribution "
                f"~{self.attribution_flops:.2g} FLOPs)")

    def report(self) -> dict:
        """The attribution's FLOPs (an estimate) count as the stage's: the loop trained 0 steps."""
        return {"flops": self.attribution_flops, "erased_neurons": [list(n) for n in self.erased]}

    def attribute(self, model, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(per neuron: how many documents keep it, its IG summed over every token; documents; tokens)."""
        o, device, n_params = self.options, model_device(model), non_embedding_params(model)
        counts = totals = None
        docs = tokens = 0
        for ids, labels, sensitive in zip(rows["input_ids"], rows["labels"], rows["sensitive"]):
            targets = ((labels != IGNORE) & sensitive.bool()).nonzero().squeeze(1)
            targets = targets[targets > 0]
            if not len(targets):
                continue
            scores = token_attributions(model, ids.to(device), targets.to(device), o.ig_steps, o.attribution_batch)
            # one capture forward (2N per token), then per layer and point a forward and a backward to
            # the activations only (~4N per token), on the row cut after its last target
            width, layers = int(targets.max()) + 1, scores.shape[1]
            self.attribution_flops += (2 + 4 * layers * o.ig_steps * len(targets)) * width * n_params
            kept = kept_neurons(scores, o.threshold, o.threshold_on).long()
            counts = kept if counts is None else counts + kept
            totals = scores.sum(0) if totals is None else totals + scores.sum(0)
            docs, tokens = docs + 1, tokens + len(targets)
        if counts is None:
            raise UndoError("depn: no forget document has a sensitive token to attribute; the task must mark "
                            "spans (task privacy does)")
        return counts.cpu(), totals.cpu(), docs, tokens
