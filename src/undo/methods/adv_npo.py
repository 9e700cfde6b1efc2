"""AdvNPO (Yuan et al. 2024, LAU): NPO on forget sequences while a residual-stream adversary
tries to bring them back.

The adversary is AdvGA's (adv_ga.latent_attack: a per-position L2 PGD perturbation of the
stream entering `layer` that lowers the forget CE, random start). Outer:
    L = -(2/b) * mean_rows log sigmoid(-b * (log pi(y | d) - log pi_ref(y))) + a * R(retain),
log pi(y | d) = the forget example's summed log-prob under the perturbation, pi_ref the frozen
reference without it; b = 0.1 (NPO's). R (CE or KL to the reference) without d.
"""

from __future__ import annotations

import dataclasses

from ..losses import sequence_logprob
from ..training import LossOutput
from .adv_ga import AdvGAOptions, adversarial_logits, adversary_layer
from .base import Method, frozen_logits
from .npo import npo_loss


@dataclasses.dataclass
class AdvNPOOptions(AdvGAOptions):
    beta: float = 0.1


class AdvNPO(Method):
    name = "adv_npo"
    description = "LAU's AdvNPO: NPO on forget under a residual-stream PGD adversary (+ retain term)"
    Options = AdvNPOOptions
    forget_needs = frozenset({"forget", "reference"})
    row_format = "padded"

    def prepare(self, model) -> None:
        adversary_layer(model, self.options.layer)  # a layer out of range fails before training

    def loss(self, model, batches) -> LossOutput:
        forget = batches["forget"]
        logits, logs, flops = adversarial_logits(model, forget, self.options, self.seed)
        logp = sequence_logprob(logits, forget["labels"])
        ref_logits, ref_flops = frozen_logits(self.reference, forget)
        ref_logp = sequence_logprob(ref_logits, forget["labels"])
        loss = npo_loss(logp, ref_logp, self.options.beta)
        logs = {"npo": loss.item(), "forget_logratio": (logp - ref_logp).mean().item(), **logs}
        return self.with_retain(model, batches, LossOutput(loss, logs, flops + ref_flops))
