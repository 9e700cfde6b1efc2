"""Training and distillation throughput (tokens/s) and MFU on a GPU.

    python benchmarks/gpu.py                                   # gemma2-0.1b, gemma2-0.3b, llama-1b
    python benchmarks/gpu.py --presets llama-1b --batch-size 16 --seq-len 2048
    python benchmarks/gpu.py --tiny                            # seconds-long smoke check, CPU is fine

Each workload runs `undo.training.train` on a synthetic stream (random tokens, full rows)
with the settings the stages use: fp32 weights, bf16 autocast on GPU, AdamW, grad clip 1.
A short warm-up run (kernels, allocator) comes first, then a timed run of `--steps` steps.

MFU = model FLOPs per second / peak dense bf16 FLOPs (H100 SXM: 989e12; pass
`--peak-flops` for another GPU). Model FLOPs are undo's own count (TrainResult.flops):
6 x N x tokens for the trained model (N = non-embedding parameters, a tied output head
counted once) plus, for distillation, 2 x N_teacher x tokens of the teacher's forward.
Gradient checkpointing's recomputation is not counted (that is the convention for MFU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_model, run_workload  # noqa: E402

from undo.models import count_params, non_embedding_params  # noqa: E402
from undo.training import TrainConfig  # noqa: E402

H100_SXM_BF16 = 989e12
DEFAULT_PRESETS = ["gemma2-0.1b", "gemma2-0.3b", "llama-1b"]


def bench(preset: str, kind: str, args: argparse.Namespace) -> dict:
    model = make_model(preset, None, args.vocab, attn=args.attn)
    if torch.cuda.is_available():
        model = model.cuda()
    base = dict(batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-5, schedule="constant", checkpoint_every=0,
                gradient_checkpointing=args.gradient_checkpointing, compile=args.compile)
    run_workload(kind, model, TrainConfig(steps=args.warmup, **base))  # warm-up: not timed
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if args.profile:
        profile(kind, model, TrainConfig(steps=3, **base))
    result = run_workload(kind, model, TrainConfig(steps=args.steps, **base))
    seconds = result.wall_seconds  # the training loop only: no setup (teacher copy, optimizer)
    row = {"preset": preset, "workload": kind, "params": count_params(model),
           "non_embedding_params": non_embedding_params(model), "vocab": model.config.vocab_size,
           "attn": model.config._attn_implementation, "batch": f"{args.batch_size}x{args.seq_len}",
           "compile": args.compile,
           "tokens_per_s": result.tokens / seconds, "model_flops_per_s": result.flops / seconds,
           "seconds": seconds, "steps": result.steps, "final_loss": result.final_loss}
    row["mfu"] = row["model_flops_per_s"] / args.peak_flops if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def profile(kind: str, model, cfg: TrainConfig) -> None:
    """Where a step's GPU time goes: the top kernels of `cfg.steps` steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_workload(kind, model, cfg)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    p.add_argument("--workloads", nargs="+", default=["train", "distill"], choices=["train", "distill"])
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: each preset's real tokenizer's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-flops", type=float, default=H100_SXM_BF16, help="peak dense bf16 FLOP/s of the GPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (TrainConfig.compile)")
    p.add_argument("--attn", default=None, help="attention implementation (sdpa, eager; default: transformers')")
    p.add_argument("--profile", action="store_true", help="print the top GPU kernels of 3 steps per workload")
    p.add_argument("--tiny", action="store_true", help="smoke check: preset tiny, small batches, few steps (CPU ok)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    if args.tiny:
        args.presets, args.batch_size, args.seq_len, args.steps, args.warmup = ["tiny"], 4, 64, 3, 1
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (MFU not reported)"
    print(f"device: {device}; batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps")
    print(f"{'preset':12s} {'workload':8s} {'params':>8s} {'vocab':>7s} {'attn':>6s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'mem GB':>7s}")
    rows = []
    for preset in args.presets:
        for kind in args.workloads:
            try:
                row = bench(preset, kind, args)
            except torch.cuda.OutOfMemoryError:
                print(f"{preset:12s} {kind:8s} out of GPU memory: lower --batch-size or add --gradient-checkpointing")
                rows.append({"preset": preset, "workload": kind, "error": "oom"})
                torch.cuda.empty_cache()
                continue
            rows.append(row)
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
            mem = f"{row['peak_mem_gb']:.1f}" if "peak_mem_gb" in row else "-"
            print(f"{preset:12s} {kind:8s} {row['params'] / 1e6:7.0f}M {row['vocab']:7d} {row['attn']:>6s} {row['tokens_per_s']:10.0f} "
                  f"{row['model_flops_per_s'] / 1e12:8.2f} {mfu:>6s} {mem:>7s}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
