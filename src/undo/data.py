"""From examples to batches: tokenize, mask, pack into fixed-length rows, and stream.

A row is `input_ids`, `attention_mask` and `labels` (-100 where no loss falls: padding,
BOS, and prompts when the loss is on completions only). Whole examples are packed
greedily into rows of `seq_len` tokens (no padding waste; text longer than a row is cut
into row-sized chunks). A `BatchStream` gives the batch of any step as a pure function
of (seed, step), so resuming at step k reproduces exactly the batches an uninterrupted
run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from .errors import UndoError
from .tasks.base import Example
from .tokenization import encode, encode_many

IGNORE = -100


def tokenize_example(tok: PreTrainedTokenizerBase, ex: Example, loss_on: Literal["completion", "all"]) -> tuple[list[int], list[bool]]:
    """[BOS] prompt completion [EOS] with a loss mask (BOS never carries loss)."""
    prompt = encode(tok, ex.prompt) if ex.prompt else []
    return _assemble(tok, prompt, encode(tok, ex.completion), loss_on)


def tokenize_examples(tok: PreTrainedTokenizerBase, examples: Sequence[Example],
                      loss_on: Literal["completion", "all"]) -> list[tuple[list[int], list[bool]]]:
    """`tokenize_example` of every example, with one batched tokenizer call per field
    (the same ids, ~10x faster than one call per text: tens of thousands of examples
    are tokenized at the start of every stage)."""
    prompts = encode_many(tok, [ex.prompt for ex in examples])
    completions = encode_many(tok, [ex.completion for ex in examples])
    return [_assemble(tok, p, c, loss_on) for p, c in zip(prompts, completions)]


def _assemble(tok: PreTrainedTokenizerBase, prompt: list[int], completion: list[int],
              loss_on: Literal["completion", "all"]) -> tuple[list[int], list[bool]]:
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids = bos + prompt + completion
    n_unscored = len(bos) if loss_on == "all" else len(bos) + len(prompt)
    mask = [False] * n_unscored + [True] * (len(ids) - n_unscored)
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
        mask.append(True)
    return ids, mask


def pack(sequences: Sequence[tuple[list[int], list[bool]]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack (ids, mask) sequences into rows of `seq_len`, in order, never splitting a
    sequence that fits in a row."""
    if seq_len < 2:
        raise UndoError(f"seq_len {seq_len} is too small; use at least 2")
    rows: list[tuple[list[int], list[bool]]] = []
    cur_ids: list[int] = []
    cur_mask: list[bool] = []
    for ids, mask in sequences:
        chunks = [(ids, mask)] if len(ids) <= seq_len else [
            (ids[i:i + seq_len], mask[i:i + seq_len]) for i in range(0, len(ids), seq_len)
        ]
        for c_ids, c_mask in chunks:
            if len(cur_ids) + len(c_ids) > seq_len:
                rows.append((cur_ids, cur_mask))
                cur_ids, cur_mask = [], []
            cur_ids = cur_ids + c_ids
            cur_mask = cur_mask + c_mask
    if cur_ids:
        rows.append((cur_ids, cur_mask))
    if not rows:
        raise UndoError("no training data: the task produced no examples for this stage")
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, seq_len), dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = t
        attention[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.where(torch.tensor(mask), t, torch.tensor(IGNORE))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pack_examples(tok: PreTrainedTokenizerBase, examples: Sequence[Example], seq_len: int,
                  loss_on: Literal["completion", "all"]) -> dict[str, torch.Tensor]:
    return pack(tokenize_examples(tok, examples, loss_on), seq_len, tok.pad_token_id)


def pad_batch(tok: PreTrainedTokenizerBase, examples: Sequence[Example], loss_on: Literal["completion", "all"],
              max_len: int | None = None) -> dict[str, torch.Tensor]:
    """One example per row, right-padded (used where rows must align with examples,
    e.g. sequence-level losses such as NPO or DPO)."""
    seqs = tokenize_examples(tok, examples, loss_on)
    width = max(len(s[0]) for s in seqs)
    if max_len is not None:
        width = min(width, max_len)
    n = len(seqs)
    input_ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        ids, mask = ids[:width], mask[:width]
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = t
        attention[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.where(torch.tensor(mask), t, torch.tensor(IGNORE))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def task_rows(tok: PreTrainedTokenizerBase, task, examples: Sequence[Example], seq_len: int,
              loss_on: Literal["completion", "all"] | None = None) -> dict[str, torch.Tensor]:
    """Rows for training on a task's examples, in the task's row format."""
    loss_on = loss_on or task.loss_on()
    if task.row_format() == "padded":
        return pad_batch(tok, examples, loss_on, max_len=seq_len)
    return pack_examples(tok, examples, seq_len, loss_on)


def shard_examples(examples: list, shard: Sequence[int] | None, seed: int) -> list:
    """The `index`-th of `count` disjoint shards of a seeded shuffle (all examples without a shard).
    Shards split the distinct examples: every copy of a repeated one (a canary seen 64 times) lands
    in the same shard, so deleting it retrains one SISA shard and leaves leave-one-out teachers that
    never saw it."""
    examples = list(examples)
    random.Random(seed + 5).shuffle(examples)
    if not shard:
        return examples
    index, count = shard
    mine = set(list(dict.fromkeys(examples))[index::count])
    return [ex for ex in examples if ex in mine]


def aux_examples(task, data: Literal["forget", "retain", "all", "old", "extra"], shard: Sequence[int] | None,
                 seed: int) -> list[Example]:
    """What an auxiliary model trains on (stages/aux.py): the task's `data` examples ("all": retain
    then forget, repeated copies included; "old": the facts a knowledge update replaces, with their
    old answers), or the `shard` = (index, count) of them. Methods that
    must know which shard model saw an example (leave-one-out) ask this same function."""
    if data == "old":  # F-Learning's old knowledge: the task's knowledge updates, before
        if not hasattr(task, "updated_facts"):
            raise UndoError(f"an auxiliary model on the old facts needs knowledge updates, which task "
                            f"'{task.name}' does not have; use task facts with task.options.update_attributes")
        return shard_examples(task.updated_facts("old"), shard, seed)
    if data == "extra":  # KGA's D_n: data disjoint from everything the models trained on
        return shard_examples(extra_examples(task), shard, seed)
    domains = ["retain", "forget"] if data == "all" else [data]
    return shard_examples([ex for d in domains for ex in task.train_examples(d)], shard, seed)


def extra_examples(task) -> list[Example]:
    """The task's extra data, disjoint from its training data (KGA's D_n), or a clear error."""
    if not hasattr(task, "extra_examples"):
        raise UndoError(f"task '{task.name}' has no extra data disjoint from its training data (KGA's D_n); "
                        f"use task facts (source: synthetic)")
    return task.extra_examples()


def slice_examples(examples: list, count: int) -> list[list]:
    """`examples` cut in order into `count` contiguous slices of near-equal size (SISA's slices of a shard)."""
    bounds = [round(k * len(examples) / count) for k in range(count + 1)]
    return [examples[bounds[k]:bounds[k + 1]] for k in range(count)]


def up_to_slice(examples: list, slice_: Sequence[int] | None) -> list:
    """With slice_ = (index, count): slices 0..index of `slice_examples(examples, count)` (SISA's
    incremental training: the model of slice r trains on every slice up to r); all without one."""
    if not slice_:
        return list(examples)
    index, count = slice_
    return [ex for part in slice_examples(examples, count)[:index + 1] for ex in part]


def aux_stream(tok: PreTrainedTokenizerBase, task, examples: Sequence[Example], batch_size: int, seq_len: int,
               seed: int) -> "BatchStream":
    """The stream an auxiliary model trains on (stages/aux.py); SISA retrains its shards on the same."""
    rows = task_rows(tok, task, examples, seq_len)
    return BatchStream(rows, batch_size, seed=seed + 7, bucket=task.row_format() == "padded")


class BatchStream:
    """Batches of rows for any step, deterministically: epoch e uses an order drawn from
    (seed, e). With `bucket`, rows of similar length share a batch (less padding): the
    epoch's shuffled order is cut into windows of 16 batches, each window sorted by length,
    and the batches of a window shuffled again. `lengths` orders the buckets instead of the
    rows' own (a stream whose row i must pair with row i of another: give it the other's)."""

    BUCKET_WINDOW = 16

    def __init__(self, rows: dict[str, torch.Tensor], batch_size: int, seed: int, bucket: bool = False,
                 lengths: torch.Tensor | None = None):
        self.rows = rows
        self.n = rows["input_ids"].shape[0]
        if self.n == 0:
            raise UndoError("a data stream has no rows; the task produced no examples")
        self.batch_size = batch_size
        self.seed = seed
        self.bucket = bucket
        self.lengths = rows["attention_mask"].sum(1) if lengths is None else lengths
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g)
            if self.bucket:
                window = self.batch_size * self.BUCKET_WINDOW
                parts = []
                for start in range(0, self.n, window):
                    chunk = order[start:start + window]
                    chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
                    batches = list(chunk.split(self.batch_size))
                    shuffled = torch.randperm(len(batches), generator=g).tolist()
                    parts.extend(batches[i] for i in shuffled)
                order = torch.cat(parts)
            self._perm_cache = {epoch: order}
        return self._perm_cache[epoch]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        start = step * self.batch_size
        idx = []
        while len(idx) < self.batch_size:
            epoch, offset = divmod(start + len(idx), self.n)
            take = min(self.batch_size - len(idx), self.n - offset)
            idx.extend(self._perm(epoch)[offset:offset + take].tolist())
        index = torch.tensor(idx)
        batch = {k: v[index] for k, v in self.rows.items()}
        # Rows are right-padded: drop the columns that are padding in every row of this batch.
        width = int(batch["attention_mask"].sum(1).max())
        return {k: v[:, :width] for k, v in batch.items()}

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.rows["input_ids"].shape[1]
