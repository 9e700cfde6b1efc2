"""The one training loop. Pretraining, every unlearning method, distillation and the
relearning attack all run through `train()`.

What a caller supplies: the model, a `loss_fn(model, batches) -> LossOutput`, named
`BatchStream`s (e.g. {"forget": ..., "retain": ...}) and a `TrainConfig`. The loop does
AdamW (or SGD), warmup + constant/cosine/linear schedule, gradient accumulation and
clipping, bf16 autocast on GPU, Hugging Face `accelerate` underneath (so DDP/FSDP are
the same code), periodic evaluation with an early-stop rule, exact checkpoint/resume
(model, optimizer, scheduler, RNG, step), a progress bar and a FLOP count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from . import arch, distributed
from .data import BatchStream
from .errors import UndoError
from .metrics import masked_ce
from .models import non_embedding_params

Batch = dict[str, torch.Tensor]


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64          # rows per optimizer step (all streams use it unless a method says otherwise)
    seq_len: int = 128
    lr: float = 1e-3
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_ratio: float = 0.1     # cosine/linear decay ends at lr * min_lr_ratio
    warmup_steps: int = 0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0        # 0 disables clipping
    grad_accum: int = 1           # micro-batches per step (batch_size must divide evenly)
    eval_every: int = 0           # 0: evaluate only at the end
    checkpoint_every: int = 100   # resume points (0: none)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # auto: the launcher's, else bf16 on GPU, fp32 on CPU
    compile: bool = False
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~1/3 more compute

    def validate(self, where: str) -> None:
        if self.steps < 0:
            raise UndoError(f"{where}.steps must be >= 0, got {self.steps}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise UndoError(f"{where}: batch_size ({self.batch_size}) must be a positive multiple of grad_accum ({self.grad_accum})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UndoError(f"{where}.lr must be a positive number, got {self.lr}")
        if len(self.betas) != 2:
            raise UndoError(f"{where}.betas needs two numbers, e.g. [0.9, 0.95]")


@dataclasses.dataclass
class LossOutput:
    loss: torch.Tensor
    logs: dict[str, float] = dataclasses.field(default_factory=dict)
    extra_flops: float = 0.0      # forward passes of frozen models (teacher, reference): 2 x params x tokens
    # The trained model's forward + backward cost when it is not 6 x params x tokens (a forward
    # truncated after one layer, a backward that stops at the first trained layer); None: 6NT.
    train_flops: Optional[float] = None


LossFn = Callable[[torch.nn.Module, dict[str, Batch]], LossOutput]


@dataclasses.dataclass
class TrainResult:
    steps: int
    tokens: int
    flops: float
    wall_seconds: float
    history: list[dict[str, Any]]       # evaluations: {"step": k, **metrics}
    stopped_early: bool
    final_loss: float
    # FSDP only: the full weights gathered from every shard, for the main process to save
    # (`Artifact.write(state_dict=...)`); None when the model object holds them itself.
    full_state_dict: Optional[dict[str, torch.Tensor]] = None


def lm_loss(model: torch.nn.Module, batches: dict[str, Batch]) -> LossOutput:
    """Plain next-token cross-entropy on the scored tokens of every stream."""
    losses = []
    for batch in batches.values():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses.append(masked_ce(logits, batch["labels"]))
    loss = torch.stack(losses).mean()
    return LossOutput(loss, {"ce": loss.item()})


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if cfg.schedule == "cosine":
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - (1 - cfg.min_lr_ratio) * progress
    return fn


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """A fresh accelerator for one stage (stages may differ in mixed precision); the
    process group of a multi-process launch is kept."""
    mp = cfg.mixed_precision
    if mp == "auto":  # the launcher's choice (accelerate config), else bf16 where the GPU has it
        mp = os.environ.get("ACCELERATE_MIXED_PRECISION") or (
            "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no")
    # Several processes without a GPU (torchrun on CPU): accelerate forms a gloo process
    # group only when told it is on CPU; otherwise each process would train alone.
    cpu_group = not torch.cuda.is_available() and distributed.world_size() > 1
    distributed.check_devices()
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        # step_scheduler_with_optimizer=False: our batch_size is the global batch, so the schedule
        # advances once per step; accelerate's default steps it once per process.
        return Accelerator(mixed_precision=mp, cpu=cpu_group, step_scheduler_with_optimizer=False)
    except ValueError as e:  # accelerate's own complaint about the launch config, e.g. fp16 without a GPU
        raise UndoError(f"accelerate cannot start with this configuration: {e}") from None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_activation_checkpointing(model: torch.nn.Module, on: bool, desc: str) -> None:
    """Gradient (activation) checkpointing of a HF model; transformers 5 renamed the methods."""
    new_name, old_name = ("activation_checkpointing_enable", "gradient_checkpointing_enable") if on else \
        ("activation_checkpointing_disable", "gradient_checkpointing_disable")
    method = getattr(model, new_name, None) or getattr(model, old_name, None)
    if method is None:
        raise UndoError(f"{desc}: gradient_checkpointing needs a Hugging Face model; set it to false")
    if on:  # non-reentrant checkpointing works with frozen inputs and under DDP
        method({"use_reentrant": False})
    else:
        method()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    streams: dict[str, BatchStream],
    cfg: TrainConfig,
    *,
    seed: int,
    resume_dir: Optional[Path] = None,
    evaluate: Optional[Callable[[torch.nn.Module], dict[str, float]]] = None,
    should_stop: Optional[Callable[[dict[str, float]], bool]] = None,
    params: Optional[list[torch.nn.Parameter]] = None,
    desc: str = "train",
    accelerator: Optional[Accelerator] = None,
    step_hook: Optional[Callable[[torch.nn.Module, Any, Callable[[], LossOutput]], None]] = None,
    on_start: Optional[Callable[[torch.nn.Module, dict[str, BatchStream]], None]] = None,
    on_end: Optional[Callable[[torch.nn.Module, dict[str, BatchStream]], None]] = None,
) -> TrainResult:
    """Train `model` in place for `cfg.steps` steps (or until `should_stop`).

    `params`: the parameters to optimise (default: all that require grad).
    `resume_dir`: where resume points go; if one is there, training continues from it
    and ends bitwise equal (on CPU) to an uninterrupted run.
    `step_hook(model, optimizer, closure)`: replaces the plain backward for methods
    that need several gradient evaluations per step (SAM); it must leave grads set.
    `on_start(model, streams)` / `on_end(model, streams)`: look at or edit the weights around
    training (snapshot, then negate a task vector; zero neurons with steps=0), on the model
    as it trains (sharded under FSDP). on_start sees the starting weights on every run,
    before a resume point's weights replace them; on_end runs before the final evaluation.
    """
    seed_everything(seed)
    acc = accelerator or make_accelerator(cfg)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UndoError(f"{desc}: no trainable parameters; check the method's parameter selection")
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                      foreach=True)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(model, True, desc)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    # FSDP replaces the parameters with sharded ones and points the optimizer at them;
    # clipping must see those, not the tensors collected before `prepare`.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    forward_model = torch.compile(model) if cfg.compile else model

    n_params = non_embedding_params(acc.unwrap_model(model))
    if on_start is not None:  # before a resume point's weights replace the starting ones
        with torch.no_grad():
            on_start(acc.unwrap_model(model), streams)
    start_step, tokens, flops, history, elapsed = 0, 0, 0.0, [], 0.0
    if resume_dir is not None and (resume_dir / "state.json").exists():
        state = json.loads((resume_dir / "state.json").read_text())
        acc.load_state(str(resume_dir / "accelerate"))
        _set_rng_state(torch.load(resume_dir / "rng.pt", weights_only=False))
        start_step, tokens, flops, history, elapsed = (state["step"], state["tokens"], state["flops"],
                                                       state["history"], state["elapsed"])

    def save_resume_point(step: int) -> None:
        if resume_dir is None:
            return
        tmp = resume_dir.with_name(resume_dir.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "accelerate").mkdir(parents=True)  # before anyone writes into it
        acc.wait_for_everyone()
        # Every process: under FSDP each writes its own shard (a collective); under DDP
        # accelerate writes the weights from the main process and each process its RNG.
        acc.save_state(str(tmp / "accelerate"), safe_serialization=False)
        acc.wait_for_everyone()  # all have written before the main process moves the directory
        if acc.is_main_process:
            torch.save(_rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "tokens": tokens, "flops": flops,
                                                        "history": history, "elapsed": elapsed + time.time() - t0}))
            old = resume_dir.with_name(resume_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            if resume_dir.exists():
                os.replace(resume_dir, old)
            os.replace(tmp, resume_dir)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def run_eval(step: int) -> Optional[dict[str, float]]:
        if evaluate is None:
            return None
        # Every process evaluates; the main process's numbers decide, so early stops agree.
        metrics = distributed.broadcast(evaluate(acc.unwrap_model(model)))
        history.append({"step": step, **metrics})
        return metrics

    rank, world = acc.process_index, acc.num_processes
    if cfg.batch_size % (cfg.grad_accum * world):
        raise UndoError(f"{desc}: batch_size {cfg.batch_size} does not split into grad_accum ({cfg.grad_accum}) x "
                        f"processes ({world}) equal micro-batches; choose a batch_size divisible by {cfg.grad_accum * world}")
    micro = cfg.batch_size // (cfg.grad_accum * world)

    def micro_batches(step: int, k: int) -> dict[str, Batch]:
        # Micro-batch k*world + rank of the step's global batch: W processes with accumulation
        # K split it exactly as 1 process with accumulation W*K does, so the two runs agree.
        i = k * world + rank
        out = {}
        for name, stream in streams.items():
            full = stream.batch(step)
            out[name] = {key: v[i * micro:(i + 1) * micro].to(acc.device) for key, v in full.items()}
        return out

    t0 = time.time()
    stopped_early, last_loss = False, float("nan")
    if start_step == 0 and evaluate is not None and cfg.eval_every:
        metrics = run_eval(0)
        if should_stop is not None and metrics is not None and should_stop(metrics):
            stopped_early = True
    step = start_step
    quiet = not acc.is_main_process or os.environ.get("UNDO_NO_PROGRESS") == "1"
    interactive = sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=start_step, desc=desc, leave=False, mininterval=1.0,
               disable=quiet or not interactive)
    log_every = max(1, cfg.steps // 10)  # without a terminal: a progress line every 10% (at most every 5 s)
    last_print = time.time()
    model.train()
    while step < cfg.steps and not stopped_early:
        logs: dict[str, float] = {}
        for k in range(cfg.grad_accum):
            batches = micro_batches(step, k)
            ctx = acc.no_sync(model) if k < cfg.grad_accum - 1 else contextlib.nullcontext()
            with ctx, acc.autocast():
                if step_hook is not None:
                    out = step_hook(forward_model, optimizer, lambda b=batches: loss_fn(forward_model, b))
                else:
                    out = loss_fn(forward_model, batches)
                    acc.backward(out.loss / cfg.grad_accum)
            # Several processes: the mean over processes, so that all of them see a NaN and stop together.
            loss_value = (acc.reduce(out.loss.detach(), "mean") if world > 1 else out.loss).item()
            if not math.isfinite(loss_value):
                raise UndoError(f"{desc}: loss became {loss_value} at step {step}; lower the learning rate "
                                f"(now {cfg.lr:g}) or the number of steps. Nothing was saved from this run.")
            logs = {key: logs.get(key, 0.0) + v / cfg.grad_accum for key, v in out.logs.items()}
            last_loss = loss_value
            local_tokens = sum(b["input_ids"].numel() for b in batches.values())
            tokens += local_tokens * world
            train_flops = 6.0 * n_params * local_tokens if out.train_flops is None else out.train_flops
            flops += (train_flops + out.extra_flops) * world
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix({"loss": f"{last_loss:.4f}", **{k: f"{v:.3g}" for k, v in list(logs.items())[:3]}}, refresh=False)
        if not quiet and not interactive and step % log_every == 0 and time.time() - last_print >= 5:
            last_print = time.time()
            rate = (step - start_step) / max(time.time() - t0, 1e-9)
            print(f"[undo] {desc}: step {step}/{cfg.steps} loss {last_loss:.4f} "
                  f"({rate:.1f} steps/s, ETA {(cfg.steps - step) / max(rate, 1e-9):.0f}s)", file=sys.stderr, flush=True)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            metrics = run_eval(step)
            if should_stop is not None and metrics is not None and should_stop(metrics):
                stopped_early = True
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps and not stopped_early:
            save_resume_point(step)
    bar.close()
    if on_end is not None:
        with torch.no_grad():
            on_end(acc.unwrap_model(model), streams)
    if evaluate is not None and (not history or history[-1]["step"] != step):
        run_eval(step)
    if cfg.gradient_checkpointing:  # a setting of this run, not of the model it leaves behind
        set_activation_checkpointing(acc.unwrap_model(model), False, desc)
    wall = elapsed + time.time() - t0
    gathered = None
    if acc.distributed_type == DistributedType.FSDP:
        gathered = acc.get_state_dict(model)  # a collective: every process takes part, the main one gets the weights
        for group in arch.tied_parameters(model):  # a tied head is one tensor: saved once, as save_pretrained does
            for name in group[1:]:
                gathered.pop(name, None)
    return TrainResult(steps=step, tokens=tokens, flops=flops, wall_seconds=wall, history=history,
                       stopped_early=stopped_early, final_loss=last_loss, full_state_dict=gathered)
