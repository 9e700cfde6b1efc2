"""Loss primitives shared by the unlearning methods and UNDO's distillation.

Conventions. `logits` are [batch, seq, vocab]; position t predicts token t+1. A `mask`
passed to a token-level loss is [batch, seq] and aligned with the logits' positions:
True where the prediction made at that position counts. `scored_positions(labels)`
turns a batch's labels (IGNORE = -100 where no loss falls) into that mask, so padding
and (for completion-only tasks) prompt tokens never enter a loss. Every mean is over
masked positions only; an empty mask gives 0, not NaN. All maths runs in float32.

The losses over the vocabulary (forward_kl, soft_cross_entropy, uniform_kl), on logits of
more than DENSE_ELEMENTS, work on the masked positions only, a chunk of positions at a time,
and their backward recomputes each chunk (`_VocabLoss`): no float32 [batch, seq, vocab]
tensor is built (the one-line forms built four; at a 256k vocabulary and 2048 positions,
2 GB each per row of the batch). Smaller logits take the one-line form, the fastest there.
Both run the same float32
operations in the same order at each position, so values and gradients are bitwise those of
the one-line form in each docstring (tests/test_losses.py checks it).
"""

from __future__ import annotations

import math
from typing import Optional

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


# Logits of at most this many elements (16 MB of float32) take the one-line form under autograd
# (the fastest there: no gathers, no recomputation); larger ones the chunked form (bitwise the
# same numbers).
DENSE_ELEMENTS = 2**22
# Positions x vocabulary of one chunk: 256 kB of float32 on a CPU (chunks that stay in cache
# are the fastest there), 256 MB on an accelerator (few kernel launches).
CHUNK_ELEMENTS = {"cpu": 2**16}
CHUNK_ELEMENTS_DEFAULT = 2**26
# Up to this many masked positions x vocabulary, the chunked form keeps its chunks' float32
# terms for the backward instead of recomputing them: 2 x 16 MB on a CPU; 2 x 8 GB on an
# accelerator, where recomputing cost distillation 28% of its speed (H200, gemma2-0.3b,
# 8 x 1024 tokens, 256k vocabulary: 40k -> 29k tokens/s) and memory is plentiful.
KEEP_ELEMENTS = 2**22
KEEP_ELEMENTS_ACCELERATOR = 2**31


def keep_elements(device: torch.device) -> int:
    return KEEP_ELEMENTS if device.type == "cpu" else KEEP_ELEMENTS_ACCELERATOR


def chunk_positions(device: torch.device, vocab: int) -> int:
    """How many positions one chunk of a vocabulary loss holds on `device`."""
    return max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS_DEFAULT) // vocab)


def _terms(student: torch.Tensor, target: Optional[torch.Tensor], rows: Optional[torch.Tensor], kind: str,
           temperature: float, shift_tokens: Optional[torch.Tensor],
           shift: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Float32 log p_s at the positions `rows` (None: all) and the target's term there:
    log p_t ("kl"), p_t ("soft_ce", after the shift) or None ("uniform")."""
    vocab = student.shape[-1]

    def at_rows(x: torch.Tensor) -> torch.Tensor:
        if rows is None:
            return x.reshape(-1, vocab)
        if x.is_contiguous():
            return x.view(-1, vocab)[rows]
        return x[rows // x.shape[1], rows % x.shape[1]]  # e.g. a joined forward's slice: no full copy

    scaled = kind == "kl" and temperature != 1.0  # x / 1 is x: no pass over the logits for it
    s = at_rows(student).float()
    s_logp = F.log_softmax(s / temperature if scaled else s, dim=-1)
    if kind == "uniform":
        return s_logp, None
    t = at_rows(target).float()
    if kind == "kl":
        return s_logp, F.log_softmax(t / temperature if scaled else t, dim=-1)
    if shift_tokens is not None:  # out of place (never into the caller's logits); x + (-b) is x - b, bitwise
        tokens = shift_tokens.reshape(-1) if rows is None else shift_tokens.reshape(-1)[rows]
        t = t.scatter_add(-1, tokens.unsqueeze(-1), torch.full((len(tokens), 1), -shift, dtype=t.dtype, device=t.device))
    return s_logp, F.softmax(t, dim=-1)


def _value(kind: str, s_logp: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-position loss from `_terms`, as the one-line forms write it."""
    if kind == "kl":  # t = log p_t
        return (t.exp() * (t - s_logp)).sum(-1)
    if kind == "soft_ce":  # t = p_t
        return -(t * s_logp).sum(-1)
    return -math.log(s_logp.shape[-1]) - s_logp.mean(-1)


class _VocabLoss(torch.autograd.Function):
    """The chunked form of `_per_position`: at the positions of `mask` only (0 elsewhere), a
    chunk of positions at a time; backward recomputes each chunk (or reuses it, below
    KEEP_ELEMENTS). Nothing of size [B, T, V] is built but the student's gradient (in its own
    dtype). The backward is autograd's for the one-line form, op by op (the same log-softmax
    backward kernel), so gradients are bitwise equal too."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, target: Optional[torch.Tensor], mask: torch.Tensor, kind: str,
                temperature: float, shift_tokens: Optional[torch.Tensor], shift: float) -> torch.Tensor:
        rows = mask.reshape(-1).nonzero().squeeze(1)
        out = torch.zeros(mask.numel(), dtype=torch.float32, device=student.device)
        keep = ctx.needs_input_grad[0] and len(rows) * student.shape[-1] <= keep_elements(student.device)
        ctx.kept = []
        for chunk in rows.split(chunk_positions(student.device, student.shape[-1])):
            s_logp, t = _terms(student, target, chunk, kind, temperature, shift_tokens, shift)
            if keep:
                ctx.kept.append((s_logp, t))
            out[chunk] = _value(kind, s_logp, t)
        ctx.save_for_backward(student, target, rows, shift_tokens)
        ctx.kind, ctx.temperature, ctx.shift = kind, temperature, shift
        return out.view(mask.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, target, rows, shift_tokens = ctx.saved_tensors
        kind, temperature, vocab = ctx.kind, ctx.temperature, student.shape[-1]
        grad = grad.reshape(-1)
        flat = torch.zeros(student.shape[:-1].numel(), vocab, dtype=student.dtype, device=student.device)
        for i, chunk in enumerate(rows.split(chunk_positions(student.device, vocab))):
            s_logp, t = ctx.kept[i] if ctx.kept else _terms(student, target, chunk, kind, temperature,
                                                            shift_tokens, ctx.shift)
            g = grad[chunk].unsqueeze(-1)
            if kind == "kl":  # d/d s_logp of sum_v p_t (log p_t - s_logp), as autograd takes it
                d_logp = -(g * t.exp())
            elif kind == "soft_ce":
                d_logp = -(g * t)
            else:
                d_logp = (-g).expand(-1, vocab) / vocab
            d_logits = torch._log_softmax_backward_data(d_logp, s_logp, -1, torch.float32)
            if kind == "kl" and temperature != 1.0:
                d_logits = d_logits / temperature
            flat[chunk] = d_logits.to(student.dtype)
        ctx.kept = []
        return flat.view(student.shape), None, None, None, None, None, None


def _per_position(kind: str, student: torch.Tensor, target: Optional[torch.Tensor], mask: torch.Tensor,
                  temperature: float = 1.0, shift_tokens: Optional[torch.Tensor] = None,
                  shift: float = 0.0) -> torch.Tensor:
    """[B, T] values of a loss over the vocabulary (no gradient to the target):
    kind "kl": sum_v p_t (log p_t - log p_s), p = softmax(logits / temperature);
    kind "soft_ce": -sum_v p_t log p_s, each position's target logit at `shift_tokens` first
    lowered by `shift` (UNDIAL; None: no shift); kind "uniform": -log V - mean_v log p_s.
    Small logits: the one-line form under autograd; large ones: `_VocabLoss`, which is 0 where
    `mask` is False (masked_mean ignores those positions either way)."""
    target = None if target is None else target.detach()
    if student.numel() > DENSE_ELEMENTS:
        return _VocabLoss.apply(student, target, mask, kind, temperature, shift_tokens, shift)
    return _value(kind, *_terms(student, target, None, kind, temperature, shift_tokens, shift)).view(mask.shape)


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """Token-level forward KL(p_teacher || p_student), averaged over masked positions.

    Per position: sum_v p_t(v) * (log p_t(v) - log p_s(v)), with p = softmax(logits / T).
    The usual T^2 factor of Hinton-style distillation is NOT applied (the paper distils at
    T = 1, where it makes no difference); multiply by T**2 yourself if you want it.
    Bitwise equal to the one-line form (without its four float32 [B, T, V] tensors):
        t_logp = F.log_softmax(teacher_logits.float() / T, -1)
        s_logp = F.log_softmax(student_logits.float() / T, -1)
        masked_mean((t_logp.exp() * (t_logp - s_logp)).sum(-1), mask)
    """
    per_position = _per_position("kl", student_logits, teacher_logits, mask, temperature)
    return masked_mean(per_position, mask)


def soft_cross_entropy(target_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor,
                       lower: Optional[tuple[torch.Tensor, float]] = None) -> torch.Tensor:
    """Cross-entropy against soft targets: mean over masked positions of
    -sum_v softmax(target)(v) * log softmax(student)(v). Equals forward_kl plus the
    target's entropy (same gradient, different value). `lower=(tokens, b)`: the target
    logit of each position's token (`tokens` [B, T]) is lowered by b first (UNDIAL; on large
    logits chunk by chunk, with no float32 copy of the targets). Bitwise equal to the one-line form
        masked_mean(-(F.softmax(target.float(), -1) * F.log_softmax(student.float(), -1)).sum(-1), mask)."""
    tokens, amount = lower if lower is not None else (None, 0.0)
    per_position = _per_position("soft_ce", student_logits, target_logits, mask, shift_tokens=tokens, shift=amount)
    return masked_mean(per_position, mask)


def uniform_kl(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(Uniform || p), averaged over masked positions: per position
    sum_v (1/V) * (log(1/V) - log p(v)) = -log V - mean_v log p(v). Zero iff p is uniform.
    Bitwise equal to masked_mean(-math.log(V) - F.log_softmax(logits.float(), -1).mean(-1), mask)."""
    per_position = _per_position("uniform", logits, None, mask)
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
