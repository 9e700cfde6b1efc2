"""Peak memory of one training step, one distillation step and one RMU step.

    python benchmarks/memory.py --preset gemma2-0.3b --batch-size 8 --seq-len 1024
    python benchmarks/memory.py --path /models/gemma-2-2b --gradient-checkpointing
    python benchmarks/memory.py --preset tiny                      # a quick CPU check

GPU: torch.cuda.max_memory_allocated (tensors only; the caching allocator reserves more).
CPU: the process's peak resident set size (ru_maxrss), which includes the Python runtime
and libraries. Each workload runs in a fresh subprocess so one peak never hides another.
A step is measured over `--steps` optimizer steps (2 by default: the first allocates
AdamW's state, the second shows the steady state). "weights" is what was allocated
before the first step (models on the device); "peak" the maximum during the steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import WORKLOADS, default_vocab, make_model, run_workload  # noqa: E402

from undo.training import TrainConfig  # noqa: E402

MB = 2**20


def rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MB
    return float("nan")


def measure(args: argparse.Namespace) -> dict:
    """One workload, in this process: the child side of the benchmark."""
    cuda = torch.cuda.is_available() and not args.cpu
    model = make_model(args.preset, args.path, args.vocab)
    if cuda:
        model = model.cuda()
        torch.cuda.synchronize()
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-5,
                      schedule="constant", checkpoint_every=0, gradient_checkpointing=args.gradient_checkpointing)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / MB
    else:
        before = rss_now_mb()
    result = run_workload(args.child, model, cfg, rmu_layer=args.rmu_layer)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / MB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB
    return {"workload": args.child, "device": "cuda" if cuda else "cpu", "weights_mb": round(before, 1),
            "peak_mb": round(peak, 1), "tokens_per_step": args.batch_size * args.seq_len,
            "final_loss": result.final_loss}


def child_command(args: argparse.Namespace, kind: str) -> list[str]:
    cmd = [sys.executable, __file__, "--child", kind, "--preset", args.preset, "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    for flag, value in (("--path", args.path), ("--vocab", args.vocab), ("--rmu-layer", args.rmu_layer)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + ["--gradient-checkpointing"] * args.gradient_checkpointing + ["--cpu"] * args.cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (see `undo presets`)")
    p.add_argument("--path", default=None, help="a local HF checkpoint instead of a preset")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary of a preset model (default: its real tokenizer's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--rmu-layer", type=int, default=None, help="RMU's steered layer L (default: RMU's own default)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--cpu", action="store_true", help="measure on CPU even if a GPU is present")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    model_name = args.path or f"{args.preset} (vocab {args.vocab or default_vocab(args.preset)})"
    print(f"model: {model_name}; batch {args.batch_size} x {args.seq_len} tokens; "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    rows = []
    for kind in args.workloads:
        done = subprocess.run(child_command(args, kind), capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"workload": kind, "error": tail})
            print(f"{kind:8s} failed: {tail}")
            continue
        row = json.loads(lines[-1][7:])
        rows.append(row)
        print(f"{kind:8s} {row['device']:5s} weights {row['weights_mb']:10.1f} MB   peak {row['peak_mb']:10.1f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model_name, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
