"""RepNoise (representation noising).

L = CE(retain) + b * MMD(forget MLP activations, Gaussian noise) - a * log(mean forget CE across layers + 1)

- MMD: per decoder layer, the MLP outputs on a forget batch (padding zeroed), one
  flattened vector per row, against standard normal noise of the same shape (same
  zeros); a multi-bandwidth Gaussian kernel (losses.gaussian_mmd); mean over layers.
- Forget CE across layers: the CE on forget scored tokens of every layer's output read
  through the final norm and the LM head ("logit lens"; the last layer's is the model's
  own logits); the mean of these. RepNoise's public code also adds the embedding
  layer's read-out and counts the final logits twice; here each layer counts once.
- The noise comes from torch's global generator, which train() seeds and checkpoints,
  so runs are reproducible and resume exactly.
Defaults a = 1, b = 1e-3 (RepNoise's); the UNDO paper grids (a, b) from (0.1, 1e-4) to (4, 4).
Compute: beyond the loop's 6 x params x tokens, the read-outs and the MMD Gram matrices are
counted (`extra_flops`).
"""

from __future__ import annotations

import dataclasses

import torch

from .. import arch
from ..errors import UndoError
from ..losses import gaussian_mmd
from ..metrics import masked_ce
from ..training import LossOutput
from .base import Method, check_weights, logits_of


@dataclasses.dataclass
class RepNoiseOptions:
    alpha: float = 1.0   # a: weight of the -log(forget CE + 1) term
    beta: float = 1e-3   # b: weight of the MMD-to-noise term

    def validate(self, where: str) -> None:
        check_weights(where, alpha=self.alpha, beta=self.beta)


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm applied before the LM head (Llama/Gemma `norm`, GPT-2 `ln_f`, NeoX `final_layer_norm`)."""
    body = arch.unwrap(model).base_model
    for name in ("norm", "ln_f", "final_layer_norm"):
        module = getattr(body, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise UndoError(f"repnoise: cannot find the final norm of a '{arch.unwrap(model).config.model_type}' model; "
                    f"add its name to undo/methods/repnoise.py:final_norm")


def run_with_activations(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """One forward pass; returns (logits, each layer's output, each layer's MLP output)."""
    inner = arch.unwrap(model)
    layer_out: list[torch.Tensor] = []
    mlp_out: list[torch.Tensor] = []
    handles = []
    for i, layer in enumerate(arch.decoder_layers(inner)):
        handles.append(layer.register_forward_hook(lambda m, a, out: layer_out.append(out[0] if isinstance(out, tuple) else out)))
        handles.append(arch.mlp_down(inner, i).register_forward_hook(lambda m, a, out: mlp_out.append(out)))
    try:
        logits = logits_of(model, batch)
    finally:
        for h in handles:
            h.remove()
    return logits, layer_out, mlp_out


def extra_flops(head_params: int, forget_tokens: int, layers: int, mlp_out: list[torch.Tensor]) -> float:
    """FLOPs that 6 x params x tokens misses, forward + backward at 6 per parameter-token as there:
    the LM head read-out of every layer but the last (whose logits the model computes anyway), and
    each layer's MMD Gram matrix over the 2B flattened activation vectors of length T x hidden."""
    read_outs = 6.0 * head_params * forget_tokens * (layers - 1)
    gram = sum(6.0 * (2 * act.shape[0]) ** 2 * act[0].numel() for act in mlp_out)
    return read_outs + gram


class RepNoise(Method):
    name = "repnoise"
    description = "retain CE + b * MMD(forget activations, noise) - a * log(forget CE across layers + 1)"
    Options = RepNoiseOptions

    def needs(self):
        return frozenset({"forget", "retain"})

    def loss(self, model, batches) -> LossOutput:
        o = self.options
        forget = batches["forget"]
        labels, keep = forget["labels"], forget["attention_mask"].unsqueeze(-1).float()
        logits, layer_out, mlp_out = run_with_activations(model, forget)

        mmd = torch.stack([
            gaussian_mmd((act.float() * keep).flatten(1), (torch.randn_like(act.float()) * keep).flatten(1))
            for act in mlp_out
        ]).mean()
        norm, head = final_norm(model), arch.unwrap(model).get_output_embeddings()
        layer_ces = [masked_ce(head(norm(h)), labels) for h in layer_out[:-1]] + [masked_ce(logits, labels)]
        forget_ce = torch.stack(layer_ces).mean()

        retain_ce = masked_ce(logits_of(model, batches["retain"]), batches["retain"]["labels"])
        loss = retain_ce + o.beta * mmd - o.alpha * torch.log(forget_ce + 1)
        extra = extra_flops(head.weight.numel(), forget["input_ids"].numel(), len(layer_out), mlp_out)
        return LossOutput(loss, {"retain_ce": retain_ce.item(), "forget_ce": layer_ces[-1].item(),
                                 "forget_ce_layers": forget_ce.item(), "mmd": mmd.item()}, extra_flops=extra)
