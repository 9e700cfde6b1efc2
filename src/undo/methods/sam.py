"""SAM (sharpness-aware minimisation) around any other method.

Each step: gradient g at w; move to w + rho * g / ||g|| (norm over all trained
parameters); take the gradient there; put the weights back exactly; the optimiser then
steps from w with that gradient. rho = 0.01. Costs two forward/backward passes a step
(the second is counted in the FLOPs). Needs grad_accum = 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import UndoError
from ..models import non_embedding_params
from ..training import LossOutput
from .base import Method, build_method, method_class


@dataclasses.dataclass
class SAMOptions:
    base_method: str = "graddiff"
    base_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    rho: float = 0.01

    def validate(self, where: str) -> None:
        if self.base_method == "sam":
            raise UndoError(f"{where}.base_method: SAM cannot wrap itself; pick one of the other methods")
        method_class(self.base_method)  # unknown names raise with the list
        if self.rho <= 0:
            raise UndoError(f"{where}.rho must be > 0, got {self.rho}")


def sam_step(model: torch.nn.Module, params: list[torch.nn.Parameter], closure, rho: float) -> tuple[LossOutput, LossOutput]:
    """One SAM gradient: returns (output at w, output at w + e); leaves .grad = the
    gradient at w + e and the weights exactly as they were."""
    first = closure()
    first.loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else None
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        if norm is not None and norm > 0:
            scale = rho / norm
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad * scale)
    for p in params:
        p.grad = None
    second = closure()
    second.loss.backward()
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
    return first, second


class SAM(Method):
    name = "sam"
    description = "sharpness-aware steps (rho * g/||g||) around another method (option base_method)"
    Options = SAMOptions

    def __init__(self, options, task=None, seed=0):
        super().__init__(options, task, seed)
        self.base = build_method(options.base_method, options.base_options, task, seed)
        self.train_defaults = self.base.train_defaults
        self.row_format = self.base.row_format
        self._tokens = 0
        self._n_params = 0

    def needs(self):
        return self.base.needs()

    def aux_models(self):
        return self.base.aux_models()

    def attach(self, reference=None, teacher=None, aux=None) -> None:
        self.base.attach(reference=reference, teacher=teacher, aux=aux)

    def adapt(self, model):
        return self.base.adapt(model)

    def export(self, model):
        return self.base.export(model)

    def start(self, model, streams) -> None:
        self.base.start(model, streams)

    def finish(self, model, streams) -> None:
        self.base.finish(model, streams)

    def prepare(self, model) -> None:
        self.base.prepare(model)
        self._n_params = non_embedding_params(model)

    def trainable_parameters(self, model):
        return self.base.trainable_parameters(model)

    def loss(self, model, batches) -> LossOutput:
        self._tokens = sum(b["input_ids"].numel() for b in batches.values())
        return self.base.loss(model, batches)

    def pass_flops(self, out: LossOutput) -> float:
        return out.train_flops if out.train_flops is not None else 6.0 * self._n_params * self._tokens

    def step_hook(self):
        def hook(model, optimizer, closure) -> LossOutput:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            first, second = sam_step(model, params, closure, self.options.rho)
            # Two forward+backward passes, each at the base method's cost (its own train_flops
            # when it declares one, e.g. RMU's truncated pass; else 6 x params x tokens).
            passes = sum(self.pass_flops(out) for out in (first, second))
            logs = {**first.logs, "sam_loss": second.loss.item()}
            return LossOutput(first.loss, logs, first.extra_flops + second.extra_flops, train_flops=passes)
        return hook
