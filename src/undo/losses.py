"""Loss primitives shared by the unlearning methods and UNDO's distillation.

Conventions. `logits` are [batch, seq, vocab]; position t predicts token t+1. A `mask`
passed to a token-level loss is [batch, seq] and aligned with the logits' positions:
True where the prediction made at that position counts. `scored_positions(labels)`
turns a batch's labels (IGNORE = -100 where no loss falls) into that mask, so padding
and (for completion-only tasks) prompt tokens never enter a loss. Every mean is over
masked positions only; an empty mask gives 0, not NaN. All maths runs in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import IGNORE
from .metrics import token_logprobs


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions whose next token is scored (labels[:, t+1] != IGNORE)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def next_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions whose next token is a real one (tokens t and t + 1 both unpadded),
    the positions of a row whose prediction is of a token in the data. A row's last real position
    predicts past its text and a padding position predicts padding: neither counts. It is
    `attention_mask` shifted as the logits are (position t predicts token t + 1)."""
    real = attention_mask.bool()
    mask = torch.zeros_like(real)
    mask[:, :-1] = real[:, :-1] & real[:, 1:]
    return mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, T] over positions where `mask` is True (0 if none are)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """Token-level forward KL(p_teacher || p_student), averaged over masked positions.

    Per position: sum_v p_t(v) * (log p_t(v) - log p_s(v)), with p = softmax(logits / T).
    The usual T^2 factor of Hinton-style distillation is NOT applied (the paper distils at
    T = 1, where it makes no difference); multiply by T**2 yourself if you want it.
    """
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_position = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return masked_mean(per_position, mask)


def soft_cross_entropy(target_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets: mean over masked positions of
    -sum_v softmax(target)(v) * log softmax(student)(v). Equals forward_kl plus the
    target's entropy (same gradient, different value)."""
    target = F.softmax(target_logits.float(), dim=-1)
    s_logp = F.log_softmax(student_logits.float(), dim=-1)
    return masked_mean(-(target * s_logp).sum(-1), mask)


def uniform_kl(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(Uniform || p), averaged over masked positions: per position
    sum_v (1/V) * (log(1/V) - log p(v)) = -log V - mean_v log p(v). Zero iff p is uniform."""
    logp = F.log_softmax(logits.float(), dim=-1)
    per_position = -math.log(logits.shape[-1]) - logp.mean(-1)
    return masked_mean(per_position, mask)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: summed log p of each row's scored tokens (log pi(y) of a sequence; -sNLL)."""
    logp, _ = token_logprobs(logits, labels)
    return logp.sum(-1)


def scored_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """[B]: number of scored tokens per row (|y|), at least 1."""
    return (labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)


def masked_mse(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error between hidden states [B, T, H] over masked positions:
    mean over masked (b, t) and all h of (x - y)^2. `y` may broadcast (e.g. c * u)."""
    diff = (x.float() - y.float()).pow(2).mean(-1)
    return masked_mean(diff, mask)


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Squared MMD between samples x [n, d] and y [m, d] with a sum of `kernel_num` Gaussian
    kernels exp(-||a - b||^2 / s_i), s_i = s * kernel_mul^(i - kernel_num // 2), where s is
    the mean pairwise squared distance of all n + m samples (no gradient through s), as in
    RepNoise. Returns mean K(x,x) + mean K(y,y) - 2 mean K(x,y)."""
    total = torch.cat([x, y]).float()
    n_all = total.shape[0]
    sq_norm = total.pow(2).sum(-1)
    # ||a - b||^2 from the Gram matrix: no sqrt, so no NaN gradient at zero distance
    sq_dist = (sq_norm[:, None] + sq_norm[None, :] - 2 * total @ total.T).clamp(min=0)
    scale = sq_dist.detach().sum() / max(n_all * n_all - n_all, 1)
    base = scale / kernel_mul ** (kernel_num // 2)
    kernel = sum(torch.exp(-sq_dist / (base * kernel_mul ** i)) for i in range(kernel_num))
    n = x.shape[0]
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()
