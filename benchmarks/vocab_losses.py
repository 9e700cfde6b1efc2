"""The losses over the vocabulary (forward KL, soft cross-entropy, KL to uniform) as undo
computes them (chunked; the one-line form itself for small logits) against their one-line
float32 forms, forward + backward, on the same logits.

    python benchmarks/vocab_losses.py                                  # CPU shapes of the presets
    python benchmarks/vocab_losses.py --shape 2 1024 256000 --dtype bf16   # a Gemma-2 vocabulary

Prints the median time of each (CPU time of this process on a CPU, wall time on a GPU), how
many [batch, seq, vocab] tensors each builds (the one-line forms: several float32 ones; the
chunked forms: the gradient alone), and whether values and gradients are bitwise equal.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from undo.losses import forward_kl, masked_mean, soft_cross_entropy, uniform_kl


def one_line(kind: str, target: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The forms undo computed before (forward_kl divided by its temperature, 1, as it did)."""
    if kind == "forward_kl":
        t_logp, s_logp = F.log_softmax(target.float() / 1.0, -1), F.log_softmax(student.float() / 1.0, -1)
        return masked_mean((t_logp.exp() * (t_logp - s_logp)).sum(-1), mask)
    if kind == "soft_cross_entropy":
        return masked_mean(-(F.softmax(target.float(), -1) * F.log_softmax(student.float(), -1)).sum(-1), mask)
    return masked_mean(-math.log(student.shape[-1]) - F.log_softmax(student.float(), -1).mean(-1), mask)


def chunked(kind: str, target: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if kind == "forward_kl":
        return forward_kl(target, student, mask)
    if kind == "soft_cross_entropy":
        return soft_cross_entropy(target, student, mask)
    return uniform_kl(student, mask)


class FullSize(TorchDispatchMode):
    """How many tensors of batch x seq x vocab elements the ops build (views of the inputs excluded)."""

    def __init__(self, inputs: list[torch.Tensor]):
        super().__init__()
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}
        self.full = inputs[0].numel()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.full:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.inputs:
                    self.storages.add(ptr)
        return out


def run(fn, kind: str, target: torch.Tensor, student: torch.Tensor, mask: torch.Tensor):
    student.grad = None
    loss = fn(kind, target, student, mask)
    loss.backward()
    return loss.detach(), student.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, action="append", metavar=("BATCH", "SEQ", "VOCAB"),
                    help="logits shape (repeatable); default: 64x24x714 (arithmetic distillation), "
                         "16x128x512 (language), 64x128x1024")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # CPU: this process's CPU time (other processes on a shared machine do not count); GPU: wall time
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    shapes = args.shape or [(64, 24, 714), (16, 128, 512), (64, 128, 1024)]
    print(f"device={device.type} threads={torch.get_num_threads()} dtype={args.dtype}")
    print(f"{'loss':20} {'shape':>16} {'one-line ms':>12} {'undo ms':>11} {'speed-up':>9} "
          f"{'one-line BxTxV':>15} {'undo BxTxV':>11} bitwise")
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        target = (torch.randn(*shape, generator=g) * 3).to(device, dtype)
        student = (torch.randn(*shape, generator=g) * 3).to(device, dtype).requires_grad_()
        mask = (torch.rand(shape[:2], generator=g) > 0.1).to(device)
        for kind in ("forward_kl", "soft_cross_entropy", "uniform_kl"):
            times: dict[str, list[float]] = {"one": [], "chunked": []}
            for _ in range(args.repeats):
                for name, fn in (("one", one_line), ("chunked", chunked)):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = clock()
                    run(fn, kind, target, student, mask)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(clock() - t0)
            sizes, results = {}, {}
            for name, fn in (("one", one_line), ("chunked", chunked)):
                with FullSize([target, student]) as full:
                    value, grad = run(fn, kind, target, student, mask)
                sizes[name], results[name] = len(full.storages), (value, grad.clone())
            same = all(torch.equal(a, b) for a, b in zip(results["one"], results["chunked"]))
            one, ours = statistics.median(times["one"]), statistics.median(times["chunked"])
            print(f"{kind:20} {'x'.join(map(str, shape)):>16} {one * 1e3:12.2f} {ours * 1e3:11.2f} {one / ours:9.2f} "
                  f"{sizes['one']:15d} {sizes['chunked']:11d} {same}", flush=True)


if __name__ == "__main__":
    main()
