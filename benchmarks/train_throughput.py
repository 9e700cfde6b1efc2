"""Tokens/s of undo's training loop vs. a bare PyTorch loop on the same model, batch and
optimizer, in one process, and their ratio (target >= 1.0: the loop adds no overhead).

    python benchmarks/train_throughput.py                 # tiny preset, CPU
    python benchmarks/train_throughput.py --compile       # both loops with torch.compile
    python benchmarks/train_throughput.py --preset small --steps 60
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("UNDO_NO_PROGRESS", "1")

import torch  # noqa: E402

from common import make_model  # noqa: E402
from undo.data import BatchStream  # noqa: E402
from undo.metrics import masked_ce  # noqa: E402
from undo.training import TrainConfig, lm_loss, train  # noqa: E402


def synthetic_rows(n: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def bare_loop(model, stream: BatchStream, cfg: TrainConfig) -> float:
    """The reference: forward, masked CE, backward, clip, AdamW step; nothing else."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0, foreach=True)
    fwd = torch.compile(model) if cfg.compile else model
    tokens, start = 0, None
    for step in range(cfg.steps):
        if step == WARMUP:
            start = time.perf_counter()
            tokens = 0
        batch = stream.batch(step)
        logits = fwd(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        masked_ce(logits, batch["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def undo_loop(model, stream: BatchStream, cfg: TrainConfig) -> float:
    marks = {}

    def mark(m):  # evaluation hook used as a clock: after the warmup steps and at the end
        marks[len(marks)] = time.perf_counter()
        return {}

    warm = TrainConfig(**{**cfg.__dict__, "steps": cfg.steps, "eval_every": WARMUP, "checkpoint_every": 0})
    train(model, lm_loss, {"train": stream}, warm, seed=0, evaluate=mark)
    # evaluations at step 0, WARMUP, 2*WARMUP, ..., and the end: time from step WARMUP to the end
    first, last = marks[1], marks[len(marks) - 1]
    timed_steps = cfg.steps - WARMUP
    return timed_steps * stream.tokens_per_batch / (last - first)


WARMUP = 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=45)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="alternate the two loops this many times, keep the best")
    args = ap.parse_args()
    vocab = 1024
    rows = synthetic_rows(args.batch_size * 8, args.seq_len, vocab)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-3, schedule="constant",
                      compile=args.compile, mixed_precision="no" if not torch.cuda.is_available() else "bf16")
    best = {"bare": 0.0, "undo": 0.0}
    for _ in range(args.repeats):
        for name, fn in (("bare", bare_loop), ("undo", undo_loop)):
            model = make_model(args.preset, None, vocab)
            if torch.cuda.is_available():
                model = model.cuda()
            best[name] = max(best[name], fn(model, BatchStream(rows, args.batch_size, seed=0), cfg))
    print(f"preset={args.preset} batch={args.batch_size}x{args.seq_len} compile={args.compile} "
          f"threads={torch.get_num_threads()} device={'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"bare PyTorch loop: {best['bare']:10.0f} tokens/s")
    print(f"undo.training    : {best['undo']:10.0f} tokens/s")
    print(f"ratio undo/bare  : {best['undo'] / best['bare']:.3f}")


if __name__ == "__main__":
    main()
