"""Useful (non-padding) tokens/s of each unlearning method, as undo trains it, against a
padded one-example-per-row baseline of the same method, on variable-length data.

    python benchmarks/methods_throughput.py                        # tiny preset, language task, CPU
    python benchmarks/methods_throughput.py --methods graddiff npo --steps 30
    python benchmarks/methods_throughput.py --task arithmetic --seq-len 64 --json out.json

ours:     the unlearn stage's own streams (`stages.unlearn.build_streams`): text packed into full
          rows for token-level losses; one example per row, bucketed by length, for sequence-level
          losses (NPO, SimNPO, IdkDPO) and padded tasks; forget + retain in one forward on an
          accelerator; the chunked vocabulary losses.
baseline: the open-unlearning way: one example per row, right-padded to the longest row of a
          random batch, one forward per batch, the one-line float32 vocabulary losses.
Both run the same method's `loss` through `undo.training.train` with the same batch size (rows)
and model; useful tokens are the non-padding tokens the loss saw. Time runs from the end of
`--warmup` steps to the last; each of the two alternates `--repeats` times and keeps its best.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("UNDO_NO_PROGRESS", "1")

import torch  # noqa: E402

from common import frozen_copy, make_model  # noqa: E402
import undo.losses as losses  # noqa: E402
import undo.methods.base as method_base  # noqa: E402
from undo.data import BatchStream, pad_batch  # noqa: E402
from undo.methods import build_method  # noqa: E402
from undo.methods.idkdpo import idk_examples  # noqa: E402
from undo.stages.unlearn import build_streams, train_config  # noqa: E402
from undo.tasks.arithmetic import ArithmeticOptions, ArithmeticTask  # noqa: E402
from undo.tasks.language import LanguageOptions, LanguageTask  # noqa: E402
from undo.tokenization import train_tokenizer  # noqa: E402
from undo.training import train  # noqa: E402

METHODS = ("grad_ascent", "graddiff", "maxent", "npo", "simnpo", "idkdpo", "undial", "oracle_matching", "rmu")


def make_task(name: str, seed: int):
    if name == "language":  # two synthetic languages, documents of 30-230 tokens
        return LanguageTask(LanguageOptions(train_documents=800, eval_documents=10), seed)
    return ArithmeticTask(ArithmeticOptions(examples_per_operation=800), seed)  # prompts of 9-29 tokens


def baseline_streams(task, tok, method, cfg, seed: int) -> dict[str, BatchStream]:
    """Every stream the method needs, one example per row, randomly batched (no bucketing)."""
    loss_on = task.loss_on()
    forget = task.train_examples("forget")
    examples = {"forget": forget, "retain": task.train_examples("retain"), "idk": idk_examples(forget, seed)}
    seeds = {"forget": seed, "retain": seed + 1, "idk": seed}  # idk row i answers forget row i
    return {name: BatchStream(pad_batch(tok, examples[name], loss_on, max_len=cfg.seq_len), cfg.batch_size, seeds[name])
            for name in ("forget", "retain", "idk") if name in method.needs()}


def measure(method_name: str, way: str, task, tok, args, device: torch.device) -> dict[str, float]:
    """Useful tokens/s, and the share of useful tokens, of `args.steps` steps of one method."""
    method = build_method(method_name, {}, task.name, seed=0)
    cfg = train_config(method, {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                                "checkpoint_every": 0, "eval_every": args.warmup, "lr": 1e-5}, method_name)
    model = make_model(args.preset, None, len(tok), seed=0).to(device)
    needs = method.needs()
    frozen = {role: frozen_copy(model) for role in ("reference", "teacher") if role in needs}
    method.attach(**frozen)
    method.prepare(model)
    params = method.trainable_parameters(model)
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    streams = build_streams(task, tok, method, cfg, seed=0) if way == "ours" else baseline_streams(task, tok, method, cfg, 0)
    counts = {"useful": 0, "cells": 0}
    marks: list[tuple[float, int, int]] = []

    def loss(model, batches):
        for batch in batches.values():
            counts["useful"] += int(batch["attention_mask"].sum())
            counts["cells"] += batch["attention_mask"].numel()
        return method.loss(model, batches)

    def clock(_model):  # evaluations at step 0, warmup, 2 x warmup, ... and the end
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), counts["useful"], counts["cells"]))
        return {}

    train(model, loss, streams, cfg, seed=0, params=params, evaluate=clock, desc=f"{method_name} {way}")
    (t0, u0, c0), (t1, u1, c1) = marks[1], marks[-1]
    return {"tokens_per_s": (u1 - u0) / (t1 - t0), "useful_share": (u1 - u0) / max(c1 - c0, 1)}


def run_way(way: str, method_name: str, task, tok, args, device: torch.device) -> dict[str, float]:
    """Ours as undo runs it; the baseline with separate forwards and one-line vocabulary losses."""
    joint, dense = dict(method_base.JOINT_FORWARD), losses.DENSE_ELEMENTS
    if way == "baseline":
        method_base.JOINT_FORWARD[device.type] = False
        losses.DENSE_ELEMENTS = 2**62
    try:
        return measure(method_name, way, task, tok, args, device)
    finally:
        method_base.JOINT_FORWARD.clear()
        method_base.JOINT_FORWARD.update(joint)
        losses.DENSE_ELEMENTS = dense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("language", "arithmetic"), default="language")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="alternate ours and the baseline this many times, keep the best")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = make_task(args.task, seed=0)
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", 512)
    print(f"task={args.task} preset={args.preset} batch={args.batch_size} rows seq_len={args.seq_len} "
          f"steps={args.steps} (timed after {args.warmup}) device={device.type} threads={torch.get_num_threads()}")
    print(f"{'method':16} {'ours tok/s':>11} {'useful':>7} {'baseline tok/s':>15} {'useful':>7} {'ratio':>6}")
    rows = []
    for name in args.methods:
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.repeats):
            for way in ("ours", "baseline"):
                got = run_way(way, name, task, tok, args, device)
                if way not in best or got["tokens_per_s"] > best[way]["tokens_per_s"]:
                    best[way] = got
        ours, base = best["ours"], best["baseline"]
        ratio = ours["tokens_per_s"] / base["tokens_per_s"]
        rows.append({"method": name, "ours": ours, "baseline": base, "ratio": ratio})
        print(f"{name:16} {ours['tokens_per_s']:11.0f} {ours['useful_share']:7.0%} {base['tokens_per_s']:15.0f} "
              f"{base['useful_share']:7.0%} {ratio:6.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device.type, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
