"""The quantization attack (Zhang et al., "Catastrophic failure of LLM unlearning via
quantization"): round the weights to a few bits and evaluate. Unlearning that moved the
weights by less than a quantization step can be undone by rounding: 4-bit quantization
brought most "forgotten" knowledge back in their experiments.

Weights are quantized by torchao (PyTorch's quantization library) with its weight-only
integer scheme (`IntxWeightOnlyConfig`): symmetric round-to-nearest, one scale per group of
`group_size` input weights (per output row when a layer's width is not a multiple of it),
scale = max|w| / ((qmax - qmin) / 2). It runs on CPU and GPU alike (the integer weights are
dequantized on the fly), so the same attack checks a tiny CPU model and a 7B checkpoint.
torchao rather than bitsandbytes (4-bit kernels only on GPU) or optimum-quanto (in
maintenance; transformers points to torchao). Every `nn.Linear` is quantized except the
output head (kept in full precision, as the quantization papers do; it shares its weights
with the input embeddings in tied models). GPT-2's `Conv1D` layers are turned into the
equivalent `nn.Linear` first.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..errors import UndoError
from ..models import load_model
from ..tasks import build_task
from .base import Attack


@dataclasses.dataclass
class QuantizeConfig:
    bits: list[int] = dataclasses.field(default_factory=lambda: [8, 4])
    group_size: int = 128               # input weights per scale; 0 = one scale per output row
    quick_eval: bool = False            # evaluate on the task's quick subset

    def validate(self, where: str) -> None:
        if not self.bits or any(b not in range(2, 9) for b in self.bits):
            raise UndoError(f"{where}.bits: give one or more bit widths from 2 to 8 (e.g. [8, 4]), got {self.bits}")
        if self.group_size < 0:
            raise UndoError(f"{where}.group_size must be >= 0 (0 = one scale per output row), got {self.group_size}")


def _conv1d_to_linear(model: torch.nn.Module) -> None:
    """Replace GPT-2 style `Conv1D` layers (weight stored as in x out) by the same `nn.Linear`."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            linear = torch.nn.Linear(module.weight.shape[0], module.weight.shape[1], device=module.weight.device,
                                     dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)


def quantized_layers(model: torch.nn.Module) -> list[str]:
    """The names of the layers `quantize_weights` rounds: every nn.Linear but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def quantize_weights(model: torch.nn.Module, bits: int, group_size: int) -> list[str]:
    """Round `model`'s linear weights to `bits`-bit integers in place (torchao, symmetric,
    per group of `group_size` input weights); returns the names of the quantized layers."""
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-only extensions fail to load on CPU: harmless
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    _conv1d_to_linear(model)
    layers = quantized_layers(model)
    names = set(layers)
    if not names:
        raise UndoError("quantize: the model has no linear layers to quantize besides its output head")
    dtype = getattr(torch, f"int{bits}")

    def grouped(module: torch.nn.Module, fqn: str) -> bool:
        return fqn in names and group_size > 0 and module.in_features % group_size == 0

    quantize_(model, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(group_size)), filter_fn=grouped)
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerAxis(0)),
              filter_fn=lambda m, fqn: fqn in names and not grouped(m, fqn))
    return layers


def dequantized_weight(module: torch.nn.Linear) -> torch.Tensor:
    """The float weight a quantized layer computes with (the weight itself if not quantized)."""
    w = module.weight
    return w.dequantize() if hasattr(w, "dequantize") and hasattr(w, "qdata") else w.detach()


class Quantize(Attack):
    name = "quantize"
    description = "round the weights to int8 / 4-bit (torchao, round-to-nearest) and evaluate (Zhang et al.)"
    Options = QuantizeConfig
    seeded = False  # round-to-nearest of the weights: nothing random, one run per model and bit width

    def points(self) -> list[dict[str, Any]]:
        return [{"bits": b} for b in self.options.bits]

    def key_options(self) -> dict[str, Any]:
        options = to_dict(self.options)
        options.pop("bits")  # one run depends on its own bit width only
        return options

    def run(self, exp, model_dir: Path, point: dict[str, Any], seed: int, desc: str) -> dict[str, Any]:
        start = time.time()
        task = build_task(exp.task, exp.seed)
        model, tok = load_model(model_dir)
        layers = quantize_weights(model, int(point["bits"]), self.options.group_size)
        metrics = task.evaluate(model, tok, quick=self.options.quick_eval)
        return {"bits": point["bits"], "curve": [{"step": 1, **metrics}], "quantized_layers": len(layers),
                "flops": 0.0, "wall_seconds": time.time() - start, "config": to_dict(self.options)}
