"""Architecture knowledge in one table: where the decoder layers, MLP down-projections
and norm weights of each supported HF causal LM live. Everything else in undo asks this
module instead of hard-coding attribute paths. It also knows which parameters are tied
(one tensor under two names) and how to read the residual stream after a layer, with
the forward pass cut short there (RMU's steering target).
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


def spec(model: torch.nn.Module) -> ArchSpec:
    model_type = unwrap(model).config.model_type
    if model_type not in ARCHS:
        raise UndoError(f"architecture '{model_type}' is not in undo's table (known: {', '.join(ARCHS)}); "
                        f"add an ArchSpec line for it in undo/arch.py")
    return ARCHS[model_type]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    model = unwrap(model)
    return _get(model, spec(model).layers)  # type: ignore[return-value]


def num_layers(model: torch.nn.Module) -> int:
    return len(decoder_layers(model))


def mlp_down(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The MLP output projection of decoder layer `layer` (nn.Linear; GPT-2: a Conv1D,
    whose weight is stored transposed as [in, out])."""
    check_layer(model, layer, "mlp_down")
    return _get(decoder_layers(model)[layer], spec(model).mlp_down)  # type: ignore[return-value]


def check_layer(model: torch.nn.Module, layer: int, what: str) -> None:
    n = num_layers(model)
    if not 0 <= layer < n:
        raise UndoError(f"{what}: layer {layer} is out of range; this model has layers 0..{n - 1}, pick layers in that range")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain HF model inside DDP/FSDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def norm_offset(model: PreTrainedModel) -> float:
    """The constant added to norm weights: a norm's scale is (offset + w). Gemma's RMSNorm
    is (1 + w), so shrinking w toward 0 (UNDO's noise step) pulls the scale toward 1, not 0."""
    return spec(unwrap(model)).norm_offset


def tied_parameters(model: torch.nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (e.g. a tied input embedding and
    output head). `named_parameters()` lists each tensor once, under its first name;
    code that edits weights by name (noise, masks) must touch a group once."""
    names: dict[int, list[str]] = {}
    for name, p in unwrap(model).named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def embeddings_tied(model: PreTrainedModel) -> bool:
    """Whether the output head is the input embedding matrix itself."""
    model = unwrap(model)
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted layer has run."""


def _hidden(output: object) -> torch.Tensor:
    # Decoder layers return a tensor in transformers 5, a tuple (hidden, ...) in 4.x.
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value,index]


def residual_stream(model: torch.nn.Module, layer: int, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, stop_early: bool | None = None) -> torch.Tensor:
    """The residual stream after decoder layer `layer` ([batch, seq, hidden]), with grad.

    This is what RMU steers; it equals `output_hidden_states=True`'s hidden_states[layer + 1]
    for every layer but the last (whose entry there is after the final norm). By default
    the forward pass stops right after `layer` (no later layers, no LM head: with a 256k
    vocabulary the head is a large share of the cost). Under DDP the pass runs to the end
    instead, because DDP expects every forward to finish; parameters after `layer` must
    then be frozen (requires_grad False) or DDP reports them unused.
    """
    inner = unwrap(model)
    check_layer(inner, layer, "residual_stream")
    if stop_early is None:
        stop_early = not isinstance(model, torch.nn.parallel.DistributedDataParallel)
    captured: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: object, output: object) -> None:
        captured.append(_hidden(output))
        if stop_early:
            raise _StopForward

    handle = decoder_layers(inner)[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]
