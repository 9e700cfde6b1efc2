"""Architecture knowledge in one table: where the decoder layers, MLP down-projections
and norm weights of each supported HF causal LM live. Everything else in undo asks this
module instead of hard-coding attribute paths.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import PreTrainedModel

from .errors import UndoError


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    layers: str               # dotted path to the ModuleList of decoder layers
    mlp_down: str             # path inside a layer to the MLP output projection (nn.Linear or Conv1D)
    norm_offset: float = 0.0  # RMSNorm scale is (offset + w): Gemma uses (1 + w)


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers", "mlp.down_proj"),
    "mistral": ArchSpec("model.layers", "mlp.down_proj"),
    "qwen2": ArchSpec("model.layers", "mlp.down_proj"),
    "qwen3": ArchSpec("model.layers", "mlp.down_proj"),
    "gemma": ArchSpec("model.layers", "mlp.down_proj", norm_offset=1.0),
    "gemma2": ArchSpec("model.layers", "mlp.down_proj", norm_offset=1.0),
    "gemma3_text": ArchSpec("model.layers", "mlp.down_proj", norm_offset=1.0),
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "phi3": ArchSpec("model.layers", "mlp.down_proj"),
}


def _get(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def spec(model: PreTrainedModel) -> ArchSpec:
    model_type = model.config.model_type
    if model_type not in ARCHS:
        raise UndoError(f"architecture '{model_type}' is not in undo's table (known: {', '.join(ARCHS)}); "
                        f"add an ArchSpec line for it in undo/arch.py")
    return ARCHS[model_type]


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    return _get(model, spec(model).layers)  # type: ignore[return-value]


def num_layers(model: PreTrainedModel) -> int:
    return len(decoder_layers(model))


def mlp_down(model: PreTrainedModel, layer: int) -> torch.nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise UndoError(f"layer {layer} is out of range: the model has layers 0..{len(layers) - 1}")
    return _get(layers[layer], spec(model).mlp_down)  # type: ignore[return-value]


def check_layer(model: PreTrainedModel, layer: int, what: str) -> None:
    n = num_layers(model)
    if not 0 <= layer < n:
        raise UndoError(f"{what}: layer {layer} is out of range; this model has layers 0..{n - 1}")
