"""PCGU (Yu et al., ACL 2023): partitioned contrastive gradient unlearning.

Data: contrastive pairs, one shared prompt and two completions that differ in the group word
(the task's forget sentences and their `contrast_examples`). Per batch:
1. the log-probability of each sequence's completion (summed over its tokens); in each pair the
   *advantaged* sequence is the one the model now finds more likely (PCGU's dynamic choice,
   inferred from the paper; `advantaged: stereotype` always takes the stereotyped sentence),
   the other the disadvantaged one;
2. g_adv, g_dis = the gradients of the batch mean of the advantaged and of the disadvantaged
   log-probabilities (two backward passes through one forward);
3. the weights are partitioned into units: each row (first index) of a matrix, a whole vector
   for a bias or norm; per unit, cos(g_adv, g_dis) (a unit where g_adv is zero cannot move and
   is never chosen);
4. the k units with the lowest cosine, where the two groups pull apart most, get grad = g_adv
   and every other unit grad 0; the optimiser (SGD, as the paper) steps against it, lowering
   the advantaged sequence's log-probability. Units are chosen afresh every batch.
Paper: k = 10000 units (of ~110k in BERT-base), lr 1e-5, batch 16, 5 epochs. `k_fraction` sets k
as a share of the model's units instead (a tiny model has a few thousand).
A step costs one forward and two backward passes (counted as 10 x params x tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from .. import distributed
from ..errors import UndoError
from ..losses import sequence_logprob
from ..models import non_embedding_params
from ..training import LossOutput
from .base import Method, logits_of_each


@dataclasses.dataclass
class PCGUOptions:
    k: int = 10000                          # units updated per batch
    k_fraction: Optional[float] = None      # k as a share of all units (overrides k)
    advantaged: Literal["model", "stereotype"] = "model"

    def validate(self, where: str) -> None:
        if self.k < 1:
            raise UndoError(f"{where}.k must be at least 1, got {self.k}")
        if self.k_fraction is not None and not 0 < self.k_fraction <= 1:
            raise UndoError(f"{where}.k_fraction must be in (0, 1] (or null to use k), got {self.k_fraction}")


def unit_cosines(g_adv: list[Optional[torch.Tensor]], g_dis: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """Per parameter, the cosine of the two gradients over each unit (a row of a matrix, the
    whole of a vector); +inf where g_adv is zero (nothing to apply) or missing."""
    out = []
    for a, d in zip(g_adv, g_dis):
        if a is None:
            out.append(None)
            continue
        a_rows = a.reshape(a.shape[0], -1) if a.dim() > 1 else a.reshape(1, -1)
        d_rows = torch.zeros_like(a_rows) if d is None else d.reshape(a_rows.shape)
        cos = F.cosine_similarity(a_rows.float(), d_rows.float(), dim=1, eps=1e-12)
        out.append(torch.where(a_rows.abs().sum(1) > 0, cos, torch.full_like(cos, float("inf"))))
    return out


def lowest_units(cosines: list[Optional[torch.Tensor]], k: int) -> list[Optional[torch.Tensor]]:
    """Per parameter, the boolean mask of its units among the k lowest cosines of all parameters
    (units with an infinite cosine never)."""
    if all(c is None for c in cosines):
        return list(cosines)
    flat = torch.cat([c for c in cosines if c is not None])
    k = min(k, int(torch.isfinite(flat).sum()))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        chosen[torch.topk(flat, k, largest=False).indices] = True
    masks, start = [], 0
    for c in cosines:
        if c is None:
            masks.append(None)
            continue
        masks.append(chosen[start:start + c.numel()])
        start += c.numel()
    return masks


def masked_gradient(grad: torch.Tensor, unit_mask: torch.Tensor) -> torch.Tensor:
    """`grad` on the chosen units (rows, or the whole vector), zero elsewhere."""
    shape = (grad.shape[0],) + (1,) * (grad.dim() - 1) if grad.dim() > 1 else (1,)
    return grad * unit_mask.reshape(shape).to(grad.dtype)


def count_units(params: list[torch.nn.Parameter]) -> int:
    return sum(p.shape[0] if p.dim() > 1 else 1 for p in params)


class PCGU(Method):
    name = "pcgu"
    description = "partitioned contrastive gradient unlearning: SGD on the k units where the pair's gradients disagree"
    Options = PCGUOptions
    forget_needs = frozenset({"forget", "contrast"})
    row_format = "padded"
    train_defaults = dict(Method.train_defaults, optimizer="sgd", lr=1e-5, batch_size=16, grad_clip=0.0)

    def __init__(self, options, task=None, seed=0):
        super().__init__(options, task, seed)
        self._disadvantaged: Optional[torch.Tensor] = None
        self._n_params = 0
        self.chosen_units: list[int] = []   # units updated per step (for the report)

    def prepare(self, model) -> None:
        if distributed.world_size() > 1:  # its two gradients are taken with autograd.grad, which DDP does not average
            raise UndoError("method 'pcgu' runs in one process; launch it without accelerate/torchrun processes")
        self._n_params = non_embedding_params(model)

    def loss(self, model, batches) -> LossOutput:
        """The batch mean of the advantaged sequences' log-probability (what the step lowers); the
        disadvantaged ones' is kept for the step hook's second gradient."""
        stereo, contrast = batches["forget"], batches["contrast"]
        logits = logits_of_each(model, [stereo, contrast])
        stereo_logp = sequence_logprob(logits[0], stereo["labels"])
        contrast_logp = sequence_logprob(logits[1], contrast["labels"])
        if self.options.advantaged == "model":
            first = stereo_logp.detach() >= contrast_logp.detach()
        else:
            first = torch.ones_like(stereo_logp, dtype=torch.bool)
        advantaged = torch.where(first, stereo_logp, contrast_logp).mean()
        self._disadvantaged = torch.where(first, contrast_logp, stereo_logp).mean()
        tokens = stereo["input_ids"].numel() + contrast["input_ids"].numel()
        logs = {"adv_logp": advantaged.item(), "dis_logp": self._disadvantaged.item(),
                "stereo_preferred": (stereo_logp > contrast_logp).float().mean().item()}
        return LossOutput(advantaged, logs, train_flops=10.0 * self._n_params * tokens)

    def step_hook(self):
        def hook(model, optimizer, closure) -> LossOutput:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            out = closure()
            g_adv = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
            g_dis = torch.autograd.grad(self._disadvantaged, params, allow_unused=True)
            self._disadvantaged = None
            k = self.units_per_step(params)
            masks = lowest_units(unit_cosines(list(g_adv), list(g_dis)), k)
            for p, g, m in zip(params, g_adv, masks):
                p.grad = None if g is None else masked_gradient(g, m)
            self.chosen_units.append(int(sum(m.sum() for m in masks if m is not None)))
            return out
        return hook

    def units_per_step(self, params: list[torch.nn.Parameter]) -> int:
        o = self.options
        return max(1, round(o.k_fraction * count_units(params))) if o.k_fraction is not None else o.k

    def report(self) -> dict:
        steps = len(self.chosen_units)
        return {"mean_units_per_step": sum(self.chosen_units) / steps} if steps else {}
