"""Relearning with LoRA adapters (Lucki et al., "An adversarial perspective on machine
unlearning for AI safety": rank 128, alpha 16, lr 2e-4; TAR uses rank 16). The base
weights stay frozen; only the adapters (through `peft`) learn, so the attack fits a real
checkpoint on one GPU. Everything else is the relearning attack: the same data, an lr
sweep, a curve per lr, robustness as the worst case over lrs and steps.

The defaults are the paper's rank and alpha; the CPU presets scale the rank down (a 128-wide
tiny model has nothing to gain from rank 128) and sweep higher learning rates, since
alpha / rank scales the adapters' update.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import UndoError
from ..models import load_model
from ..tasks import build_task
from .relearn import AttackConfig, Relearn, attack_examples, evaluation, finetune


@dataclasses.dataclass
class LoraAttackConfig(AttackConfig):
    lrs: list[float] = dataclasses.field(default_factory=lambda: [2e-4, 1e-3, 3e-3])
    rank: int = 128
    alpha: float = 16.0
    target_modules: list[str] = dataclasses.field(default_factory=list)  # module names; [] = every linear layer but the head

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.rank < 1:
            raise UndoError(f"{where}.rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise UndoError(f"{where}.alpha must be positive, got {self.alpha}")


def with_lora(model: torch.nn.Module, cfg: LoraAttackConfig, seed: int) -> torch.nn.Module:
    """`model` with fresh LoRA adapters (B = 0, so it computes exactly what `model` did);
    every base weight frozen."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the adapters' A matrices
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                target_modules=cfg.target_modules or "all-linear", bias="none"))


class RelearnLora(Relearn):
    name = "relearn_lora"
    description = "relearning through LoRA adapters (peft; Lucki et al.: rank 128, alpha 16), base weights frozen"
    Options = LoraAttackConfig
    version = 2  # 2: FLOPs count no weight gradients for the frozen base weights (4N + 2N_lora per token, not 6N)

    def run(self, exp, model_dir: Path, point: dict[str, Any], seed: int, desc: str) -> dict[str, Any]:
        cfg = self.options
        task = build_task(exp.task, exp.seed)
        model, tok = load_model(model_dir)
        model = with_lora(model, cfg, seed)
        return finetune(task, model, tok, attack_examples(task, cfg, seed), cfg, point["lr"], seed, desc,
                        evaluation(task, tok, cfg))
