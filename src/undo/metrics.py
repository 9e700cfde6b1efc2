"""Shared metrics: batched greedy exact match and masked cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import IGNORE, pad_batch
from .tasks.base import Example
from .tokenization import encode


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p(label) for next-token prediction, and the mask of scored positions.

    logits [B, T, V] predict labels shifted by one; returns ([B, T-1], [B, T-1]).
    The labels move instead of the logits, so the [B*T, V] rows are a view of the logits: a
    sliced or [B, V, T]-transposed input costs a copy and a strided kernel (4x slower at a
    256k vocabulary on CPU, the bulk of a GPU training step)."""
    batch, length, vocab = logits.shape
    target = labels[:, 1:]
    mask = target != IGNORE
    shifted = torch.cat([target.clamp(min=0), target.new_zeros(batch, 1)], dim=1)
    logp = -F.cross_entropy(logits.reshape(-1, vocab).float(), shifted.reshape(-1), reduction="none")
    return logp.view(batch, length)[:, :-1] * mask, mask


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not IGNORE."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum() / mask.sum().clamp(min=1)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_complete(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                    max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy continuations of many prompts, batched with left padding and a KV cache."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for start in range(0, len(prompts), batch_size):
        chunk = [bos + encode(tok, p) for p in prompts[start:start + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, c in enumerate(chunk):
            ids[i, width - len(c):] = torch.tensor(c)
            attn[i, width - len(c):] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        for row in gen[:, width:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            outputs.append(tok.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return outputs


@torch.no_grad()
def completion_ce(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: Sequence[Example],
                  loss_on: str = "completion", batch_size: int = 128) -> float:
    """Mean cross-entropy per scored token over `examples` (token-weighted)."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(tok, examples[start:start + batch_size], loss_on)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp, mask = token_logprobs(logits, batch["labels"])
        total += -logp.sum().item()
        count += int(mask.sum().item())
    model.train(was_training)
    return total / max(count, 1)
