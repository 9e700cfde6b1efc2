"""Task-vector negation (Ilharco et al., 2023; the forgetting step of F-Learning, Ni et al., 2023).

Finetune on the forget data (L = CE(forget)), giving theta_ft; the task vector is
Delta = theta_ft - theta; the unlearned model is theta - l * Delta. Every trained
parameter moves; `scale` is l (a hyperparameter to tune)."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import UndoError
from ..training import LossOutput
from .base import Method, ce_of


@dataclasses.dataclass
class TaskVectorOptions:
    scale: float = 1.0                  # l in theta - l * (theta_ft - theta)

    def validate(self, where: str) -> None:
        if not self.scale > 0:
            raise UndoError(f"{where}.scale must be > 0, got {self.scale}")


def negated(theta: torch.Tensor, theta_ft: torch.Tensor, scale: float) -> torch.Tensor:
    """theta - l * (theta_ft - theta), computed as -l * theta_ft + (1 + l) * theta: one rounding
    order for every caller (task-vector negation, F-Learning's forgetting step)."""
    return (theta_ft * -scale).add_(theta, alpha=1 + scale)


@torch.no_grad()
def subtract_task_vector(model: torch.nn.Module, finetuned: torch.nn.Module, scale: float) -> None:
    """In place, every weight of `model` (theta) becomes theta - l * (theta_ft - theta), theta_ft the
    same-named weight of `finetuned` (a copy of `model` finetuned further)."""
    tuned = dict(finetuned.named_parameters())
    for name, p in model.named_parameters():
        if name not in tuned or tuned[name].shape != p.shape:
            raise UndoError(f"task vector: the finetuned model has no weight '{name}' of shape {tuple(p.shape)}; "
                            f"finetune a copy of the same (unsharded) model")
        p.copy_(negated(p, tuned[name].to(p.device, p.dtype), scale))


class TaskVector(Method):
    name = "task_vector"
    description = "finetune on forget data, then subtract the change: theta - l * (theta_ft - theta)"
    Options = TaskVectorOptions
    train_defaults = dict(Method.train_defaults, steps=50, lr=1e-3)

    def start(self, model, streams) -> None:
        self._theta = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def loss(self, model, batches) -> LossOutput:
        ce = ce_of(model, batches["forget"])
        return LossOutput(ce, {"forget_ce": ce.item()})

    def finish(self, model, streams) -> None:
        l = self.options.scale
        trained = [p for p in model.parameters() if p.requires_grad]
        for p, theta in zip(trained, self._theta, strict=True):
            p.copy_(negated(theta, p, l))  # theta - l * (p - theta)
        self._theta = []
