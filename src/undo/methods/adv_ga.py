"""AdvGA (Yuan et al. 2024, LAU: latent adversarial unlearning): gradient ascent on forget data
while an adversary in the residual stream tries to bring the forgotten answers back.

Inner (the adversary, this module's `latent_attack`, shared with adv_npo): a perturbation d
[B, T, H] added to the residual stream entering decoder layer `layer`, at every real token.
It starts uniformly at random in the ball (each position's vector |d_t| <= epsilon), then
`adv_steps` L2 PGD steps lower the forget CE: d <- project(d - step_size * g / |g|), per
position, g = dCE/dd; only d moves (the weights are fixed while the adversary works).
Outer: L = -CE(forget | d) + a * R(retain), R (CE or KL to the reference) without d.

Paper: layer 4 (of 32-layer models), epsilon 8, 6 steps, random start. Inferred: the step size
(default 2.5 * epsilon / adv_steps, Madry et al.'s rule for PGD) and the per-position ball (as
the latent adversarial training code LAU builds on). `layer` unset: 4 on models of more than 8
layers, else n // 4 (a 4-layer model: layer 1, after one block as layer 4 is after a few). The random start is
seeded by the method's seed and the batch's tokens, so a resumed run draws what it drew before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Iterator
from typing import Optional

import torch

from .. import arch
from ..errors import UndoError
from ..metrics import masked_ce
from ..models import non_embedding_params
from ..training import LossOutput
from .base import Batch, Method, RetainLoss, check_weights, logits_of


@dataclasses.dataclass
class AdvGAOptions:
    layer: Optional[int] = None         # the stream entering this decoder layer is perturbed (see module doc)
    epsilon: float = 8.0                # L2 radius of each position's perturbation
    adv_steps: int = 6                  # PGD steps of the adversary per training step
    step_size: Optional[float] = None   # PGD step length (default 2.5 * epsilon / adv_steps)
    retain_weight: float = 1.0
    retain_loss: RetainLoss = "nll"

    def validate(self, where: str) -> None:
        check_weights(where, retain_weight=self.retain_weight)
        if not self.epsilon > 0:
            raise UndoError(f"{where}.epsilon must be > 0 (the adversary's L2 radius), got {self.epsilon}")
        if self.adv_steps < 1:
            raise UndoError(f"{where}.adv_steps must be at least 1, got {self.adv_steps}")
        if self.step_size is not None and not self.step_size > 0:
            raise UndoError(f"{where}.step_size must be > 0 (or unset for 2.5 * epsilon / adv_steps), got {self.step_size}")


def adversary_layer(model: torch.nn.Module, layer: Optional[int]) -> int:
    n = arch.num_layers(model)
    chosen = layer if layer is not None else (4 if n > 8 else n // 4)
    arch.check_layer(model, chosen, "adversary layer")
    return chosen


@contextlib.contextmanager
def perturbed(model: torch.nn.Module, layer: int, delta: torch.Tensor) -> Iterator[None]:
    """Within the block, `delta` [B, T, H] is added to the residual stream entering decoder layer `layer`."""
    def add(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0] + delta.to(args[0].dtype), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": hidden + delta.to(hidden.dtype)}

    handle = arch.decoder_layers(model)[layer].register_forward_pre_hook(add, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Each position's vector scaled back onto the L2 ball of radius epsilon if it lies outside."""
    norms = delta.norm(dim=-1, keepdim=True)
    return delta * (epsilon / norms.clamp(min=epsilon))


def random_start(shape: torch.Size, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """Points uniform in each position's L2 ball: a uniform direction, radius epsilon * U^(1/H)."""
    direction = torch.randn(shape, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    radius = epsilon * torch.rand((*shape[:-1], 1), generator=generator) ** (1.0 / shape[-1])
    return direction * radius


def batch_generator(seed: int, batch: Batch) -> torch.Generator:
    """A generator seeded by the method's seed and the batch's tokens (resume-exact, no state)."""
    tokens = batch["input_ids"].detach().cpu().numpy().tobytes()
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(tokens))


def latent_attack(model: torch.nn.Module, batch: Batch, layer: int, epsilon: float, steps: int,
                  step_size: float, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """The adversary: (d, the batch's CE at d's random start). d lowers the CE of `batch` under
    the fixed weights, lives on the batch's real tokens and stays in each position's ball.
    (The CE at the final d is the outer loss's, computed there once.)"""
    inner = arch.unwrap(model)  # the adversary needs no gradient sync across processes
    real = batch["attention_mask"].unsqueeze(-1).float()
    shape = torch.Size((*batch["input_ids"].shape, inner.config.hidden_size))
    delta = (random_start(shape, epsilon, generator).to(real.device) * real).requires_grad_(True)
    start_ce = 0.0
    for k in range(steps):
        with perturbed(inner, layer, delta):
            ce = masked_ce(logits_of(inner, batch), batch["labels"])
        grad, = torch.autograd.grad(ce, delta)
        start_ce = ce.item() if k == 0 else start_ce
        step = grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        delta = (project(delta.detach() - step_size * step, epsilon) * real).requires_grad_(True)
    return delta.detach(), start_ce


def adversarial_logits(model: torch.nn.Module, forget: Batch, o: AdvGAOptions,
                       seed: int) -> tuple[torch.Tensor, dict[str, float], float]:
    """The model's logits on the forget batch under the adversary's d, logs, and the adversary's
    FLOPs: each PGD step is a forward (2N per token) and a backward to the perturbed layer's
    input (2N less the layers before it)."""
    layer = adversary_layer(model, o.layer)
    step_size = o.step_size if o.step_size is not None else 2.5 * o.epsilon / o.adv_steps
    delta, start_ce = latent_attack(model, forget, layer, o.epsilon, o.adv_steps, step_size,
                                    batch_generator(seed, forget))
    inner = arch.unwrap(model)
    with perturbed(inner, layer, delta):
        logits = logits_of(model, forget)
    before = sum(p.numel() for p in arch.decoder_layers(inner)[:layer].parameters())
    flops = o.adv_steps * (4.0 * non_embedding_params(inner) - 2.0 * before) * forget["input_ids"].numel()
    return logits, {"adv_start_ce": start_ce}, flops


class AdvGA(Method):
    name = "adv_ga"
    description = "LAU's AdvGA: gradient ascent on forget under a residual-stream PGD adversary (+ retain term)"
    Options = AdvGAOptions

    def prepare(self, model) -> None:
        adversary_layer(model, self.options.layer)  # a layer out of range fails before training

    def loss(self, model, batches) -> LossOutput:
        forget = batches["forget"]
        logits, logs, flops = adversarial_logits(model, forget, self.options, self.seed)
        forget_ce = masked_ce(logits, forget["labels"])
        out = LossOutput(-forget_ce, {"forget_ce": forget_ce.item(), **logs}, flops)
        return self.with_retain(model, batches, out)
