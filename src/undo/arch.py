"""Architecture knowledge in one table: where the decoder layers, MLP down-projections
and norm weights of each supported HF causal LM live. Everything else in undo asks this
module instead of hard-coding attribute paths. It also knows which parameters are tied
(one tensor under two names) and how to read the residual stream after a layer, with
the forward pass cut short there (RMU's steering target), at every depth at once (linear
probes), or with a direction projected out of it everywhere (directional ablation).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

from .errors import UndoError


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    layers: str               # dotted path to the ModuleList of decoder layers
    mlp_down: str             # path inside a layer to the MLP output projection (nn.Linear or Conv1D)
    norm_offset: float = 0.0  # RMSNorm scale is (offset + w): Gemma uses (1 + w)
    # paths inside a layer to the modules whose outputs are added to the residual stream
    # (attention, MLP; Gemma-2/3 add them after a post-norm, so the norms are the writers)
    writers: tuple[str, ...] = ("self_attn", "mlp")


GEMMA2_WRITERS = ("post_attention_layernorm", "post_feedforward_layernorm")
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers", "mlp.down_proj"),
    "mistral": ArchSpec("model.layers", "mlp.down_proj"),
    "qwen2": ArchSpec("model.layers", "mlp.down_proj"),
    "qwen3": ArchSpec("model.layers", "mlp.down_proj"),
    "gemma": ArchSpec("model.layers", "mlp.down_proj", norm_offset=1.0),
    "gemma2": ArchSpec("model.layers", "mlp.down_proj", norm_offset=1.0, writers=GEMMA2_WRITERS),
    "gemma3_text": ArchSpec("model.layers", "mlp.down_proj", norm_offset=1.0, writers=GEMMA2_WRITERS),
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj", writers=("attn", "mlp")),
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp.dense_4h_to_h", writers=("attention", "mlp")),
    "phi3": ArchSpec("model.layers", "mlp.down_proj"),
}


def _get(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def spec(model: torch.nn.Module) -> ArchSpec:
    model_type = unwrap(model).config.model_type
    if model_type == "undo_ensemble":  # undo.ensemble (SISA): K members, K residual streams
        raise UndoError("an ensemble model (SISA) has no single residual stream to read or steer; attack it with "
                        "relearn, quantize or fewshot, or load one of its members on its own")
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


def mlp(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The MLP block of decoder layer `layer` (the module holding the down projection): its
    output is the MLP's write to the residual stream (Gemma-2/3 scale it by a post-norm after)."""
    check_layer(model, layer, "mlp")
    return _get(decoder_layers(model)[layer], spec(model).mlp_down.rsplit(".", 1)[0])  # type: ignore[return-value]


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


def residual_streams(model: torch.nn.Module, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The residual stream at every depth from one forward pass: entry k is the stream after k
    decoder layers ([batch, seq, hidden] each; k = 0: the embeddings as layer 0 reads them).
    Like `output_hidden_states=True` but with the last entry before the final norm, as for
    every other layer; the pass stops after the last layer (no LM head). Grad follows the
    caller's mode (use torch.no_grad() to read features)."""
    inner = unwrap(model)
    layers = decoder_layers(inner)
    captured: list[torch.Tensor] = []

    def read_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])

    def read_output(module: torch.nn.Module, args: object, output: object) -> None:
        captured.append(_hidden(output))
        if module is layers[-1]:
            raise _StopForward

    handles = [layers[0].register_forward_pre_hook(read_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(read_output) for layer in layers]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _project_out(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    unit = unit.to(dtype=x.dtype, device=x.device)
    return x - (x @ unit).unsqueeze(-1) * unit


@contextlib.contextmanager
def direction_ablated(model: torch.nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Within the block, `direction` is projected out of the residual stream everywhere
    (Arditi et al. 2024's directional ablation): x <- x - (x . r) r with r = direction / |direction|,
    applied to the embeddings as layer 0 reads them and to the output of every module that
    writes to the stream (`ArchSpec.writers`: attention and MLP, or Gemma-2's post-norms).
    The stream is a sum of those terms, so after every layer it has no component along r
    (up to float rounding). Equivalent to orthogonalising the weights that write to the
    stream, without touching them."""
    inner = unwrap(model)
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise UndoError("direction_ablated: the direction is zero or not finite; there is nothing to project out")
    unit = (direction / norm).detach()
    layers = decoder_layers(inner)

    def on_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (_project_out(args[0], unit), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _project_out(kwargs["hidden_states"], unit)}

    def on_output(module: torch.nn.Module, args: object, output: object) -> object:
        if isinstance(output, tuple):
            return (_project_out(output[0], unit), *output[1:])
        return _project_out(output, unit)  # type: ignore[arg-type]

    handles = [layers[0].register_forward_pre_hook(on_input, with_kwargs=True)]
    for layer in layers:
        for path in spec(inner).writers:
            handles.append(_get(layer, path).register_forward_hook(on_output))  # type: ignore[union-attr]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
