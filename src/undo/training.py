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
from .errors import DivergedError, UndoError, write_errors
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
        if self.seq_len < 2:  # a row must hold a token and the next one it predicts
            raise UndoError(f"{where}.seq_len must be at least 2, got {self.seq_len}")
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
    eval_flops: list[float] = dataclasses.field(default_factory=list)  # FLOPs so far at each history entry


def lm_loss(model: torch.nn.Module, batches: dict[str, Batch]) -> LossOutput:
    """Plain next-token cross-entropy on the scored tokens of every stream."""
    losses = []
    for batch in batches.values():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses.append(masked_ce(logits, batch["labels"]))
    loss = torch.stack(losses).mean()
    return LossOutput(loss, {"ce": loss.item()})


def _adamw_impl(device: torch.device) -> dict[str, bool]:
    """The fused CUDA kernel on a GPU (one launch per step); on CPU the multi-tensor form,
    whose numbers every cached CPU result was made with."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


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


@dataclasses.dataclass
class _Prepared:
    """The pieces of one run after `accelerate` has wrapped them."""
    acc: Accelerator
    model: torch.nn.Module                # as prepared (DDP/FSDP wrapper); unwrap to see the HF model
    forward: torch.nn.Module              # what the loss calls: `model`, compiled if asked
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]      # the optimizer's (FSDP: the sharded ones), for clipping
    n_params: int                         # non-embedding parameters: 2 x n_params FLOPs per token forward, 2 x backward
    n_trainable: int                      # of those, the trained ones: 2 x n_trainable FLOPs per token of weight gradients


@dataclasses.dataclass
class _LoopState:
    """What the loop carries from step to step; all but the last three go into resume points."""
    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    eval_flops: list[float] = dataclasses.field(default_factory=list)  # FLOPs so far at each evaluation
    elapsed: float = 0.0                  # wall seconds of the runs before the resume point
    t0: float = 0.0                       # when this run's loop started
    last_loss: float = float("nan")
    stopped_early: bool = False


def _optimizer_and_scheduler(params: list[torch.nn.Parameter], cfg: TrainConfig,
                             device: torch.device) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                      **_adamw_impl(device))
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def _prepare(model: torch.nn.Module, params: Optional[list[torch.nn.Parameter]], cfg: TrainConfig,
             acc: Accelerator, desc: str) -> _Prepared:
    """Optimizer and schedule over `params` (default: all that require grad), handed to `accelerate`."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UndoError(f"{desc}: no trainable parameters; check the method's parameter selection")
    optimizer, scheduler = _optimizer_and_scheduler(params, cfg, acc.device)
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(model, True, desc)
    n_params, n_trainable = non_embedding_params(model), non_embedding_params(model, trainable_only=True)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    # FSDP replaces the parameters with sharded ones and points the optimizer at them;
    # clipping must see those, not the tensors collected before `prepare`.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    forward = torch.compile(model) if cfg.compile else model
    return _Prepared(acc, model, forward, optimizer, scheduler, params, n_params, n_trainable)


def _check_micro_batches(cfg: TrainConfig, world: int, desc: str) -> None:
    if cfg.batch_size % (cfg.grad_accum * world):
        raise UndoError(f"{desc}: batch_size {cfg.batch_size} does not split into grad_accum ({cfg.grad_accum}) x "
                        f"processes ({world}) equal micro-batches; choose a batch_size divisible by {cfg.grad_accum * world}")


def _load_resume_point(acc: Accelerator, resume_dir: Optional[Path]) -> _LoopState:
    """The loop state (and model, optimizer, scheduler, RNG) of the resume point in `resume_dir`;
    a fresh state when there is none."""
    if resume_dir is None or not (resume_dir / "state.json").exists():
        return _LoopState()
    saved = json.loads((resume_dir / "state.json").read_text())
    acc.load_state(str(resume_dir / "accelerate"))
    _set_rng_state(torch.load(resume_dir / "rng.pt", weights_only=False))
    return _LoopState(step=saved["step"], tokens=saved["tokens"], flops=saved["flops"], history=saved["history"],
                      eval_flops=saved.get("eval_flops", []), elapsed=saved["elapsed"])


def _save_resume_point(acc: Accelerator, resume_dir: Optional[Path], state: _LoopState) -> None:
    """Write a resume point to a temporary directory, then swap it in for the old one. A failed
    write (disk full, read-only) deletes the temporary directory and ends as one UndoError."""
    if resume_dir is None:
        return
    tmp = resume_dir.with_name(resume_dir.name + ".tmp")
    fix = "free disk space or choose a writable run directory; or set checkpoint_every: 0 to train without resume points"
    with write_errors(resume_dir, fix, cleanup=tmp if acc.is_main_process else None):
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
            (tmp / "state.json").write_text(json.dumps({"step": state.step, "tokens": state.tokens,
                                                        "flops": state.flops, "history": state.history,
                                                        "eval_flops": state.eval_flops,
                                                        "elapsed": state.elapsed + time.time() - state.t0}))
            _swap_in(tmp, resume_dir)
    acc.wait_for_everyone()


def _swap_in(tmp: Path, target: Path) -> None:
    """Move the finished directory `tmp` to `target`, replacing the old one."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _evaluate(run: _Prepared, state: _LoopState, evaluate: Optional[Callable[[torch.nn.Module], dict[str, float]]],
              should_stop: Optional[Callable[[dict[str, float]], bool]]) -> bool:
    """Evaluate at the current step into the history; whether `should_stop` says to stop."""
    if evaluate is None:
        return False
    # Every process evaluates; the main process's numbers decide, so early stops agree.
    metrics = distributed.broadcast(evaluate(run.acc.unwrap_model(run.model)))
    state.history.append({"step": state.step, **metrics})
    state.eval_flops.append(state.flops)  # compute up to this point (e.g. until a stop rule first held)
    return should_stop is not None and metrics is not None and should_stop(metrics)


def _micro_batches(run: _Prepared, full: dict[str, Batch], cfg: TrainConfig, k: int) -> dict[str, Batch]:
    """Micro-batch k*world + rank of the step's global batches `full` (built once per step):
    W processes with accumulation K split them exactly as 1 process with accumulation W*K
    does, so the two runs agree."""
    world = run.acc.num_processes
    micro = cfg.batch_size // (cfg.grad_accum * world)
    i = k * world + run.acc.process_index
    return {name: {key: v[i * micro:(i + 1) * micro].to(run.acc.device) for key, v in batch.items()}
            for name, batch in full.items()}


def _count(run: _Prepared, state: _LoopState, out: LossOutput, batches: dict[str, Batch]) -> None:
    """Tokens and FLOPs of one micro-batch on every process (each process sees its own share)."""
    world = run.acc.num_processes
    local_tokens = sum(b["input_ids"].numel() for b in batches.values())
    state.tokens += local_tokens * world
    # forward, activation gradients, and weight gradients of the trained weights only (frozen
    # weights, e.g. under LoRA adapters, get none): 6N per token when everything trains
    default_flops = (4.0 * run.n_params + 2.0 * run.n_trainable) * local_tokens
    train_flops = default_flops if out.train_flops is None else out.train_flops
    state.flops += (train_flops + out.extra_flops) * world


def _train_step(run: _Prepared, state: _LoopState, loss_fn: LossFn, streams: dict[str, BatchStream],
                cfg: TrainConfig, step_hook: Optional[Callable], desc: str) -> dict[str, float]:
    """One optimizer step: forward + backward over cfg.grad_accum micro-batches (gradients
    synchronised on the last), a NaN check, clipping, the update; returns the mean logs."""
    acc, world = run.acc, run.acc.num_processes
    logs: dict[str, float] = {}
    full = {name: stream.batch(state.step) for name, stream in streams.items()}
    for k in range(cfg.grad_accum):
        batches = _micro_batches(run, full, cfg, k)
        ctx = acc.no_sync(run.model) if k < cfg.grad_accum - 1 else contextlib.nullcontext()
        with ctx, acc.autocast():
            if step_hook is not None:
                out = step_hook(run.forward, run.optimizer, lambda b=batches: loss_fn(run.forward, b))
            else:
                out = loss_fn(run.forward, batches)
                acc.backward(out.loss / cfg.grad_accum)
        # Several processes: the mean over processes, so that all of them see a NaN and stop together.
        loss_value = (acc.reduce(out.loss.detach(), "mean") if world > 1 else out.loss).item()
        if not math.isfinite(loss_value):
            raise DivergedError(f"{desc}: loss became {loss_value} at step {state.step}; lower the learning rate "
                               f"(now {cfg.lr:g}) or the number of steps. Nothing was saved from this run.")
        logs = {key: logs.get(key, 0.0) + v / cfg.grad_accum for key, v in out.logs.items()}
        state.last_loss = loss_value
        _count(run, state, out, batches)
    if cfg.grad_clip > 0:
        acc.clip_grad_norm_(run.params, cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return logs


class _Progress:
    """A progress bar on a terminal; without one (or with UNDO_PROGRESS=lines), a line every 10%
    of the steps (at most every 5 s); nothing on other processes or with UNDO_NO_PROGRESS=1."""

    def __init__(self, cfg: TrainConfig, desc: str, state: _LoopState, main_process: bool):
        self.steps, self.desc, self.start_step, self.t0 = cfg.steps, desc, state.step, state.t0
        self.quiet = not main_process or os.environ.get("UNDO_NO_PROGRESS") == "1"
        # UNDO_PROGRESS=lines: lines even on a terminal (pool workers share it)
        self.interactive = sys.stderr.isatty() and os.environ.get("UNDO_PROGRESS") != "lines"
        self.bar = tqdm(total=cfg.steps, initial=state.step, desc=desc, leave=False, mininterval=1.0,
                        disable=self.quiet or not self.interactive)
        self.log_every = max(1, cfg.steps // 10)
        self.last_print = time.time()

    def update(self, step: int, loss: float, logs: dict[str, float]) -> None:
        self.bar.update(1)
        self.bar.set_postfix({"loss": f"{loss:.4f}", **{k: f"{v:.3g}" for k, v in list(logs.items())[:3]}}, refresh=False)
        if not self.quiet and not self.interactive and step % self.log_every == 0 and time.time() - self.last_print >= 5:
            self.last_print = time.time()
            rate = (step - self.start_step) / max(time.time() - self.t0, 1e-9)
            print(f"[undo] {self.desc}: step {step}/{self.steps} loss {loss:.4f} "
                  f"({rate:.1f} steps/s, ETA {(self.steps - step) / max(rate, 1e-9):.0f}s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _full_state_dict(run: _Prepared) -> Optional[dict[str, torch.Tensor]]:
    """FSDP: the full weights gathered from every shard (the main process gets them); else None."""
    if run.acc.distributed_type != DistributedType.FSDP:
        return None
    gathered = run.acc.get_state_dict(run.model)  # a collective: every process takes part, the main one gets the weights
    for group in arch.tied_parameters(run.model):  # a tied head is one tensor: saved once, as save_pretrained does
        for name in group[1:]:
            gathered.pop(name, None)
    return gathered


def _finish(run: _Prepared, state: _LoopState, cfg: TrainConfig, streams: dict[str, BatchStream],
            evaluate: Optional[Callable], on_end: Optional[Callable], desc: str) -> TrainResult:
    """After the last step: `on_end`, the final evaluation, the FSDP gather."""
    if on_end is not None:
        with torch.no_grad():
            on_end(run.acc.unwrap_model(run.model), streams)
    if evaluate is not None and (not state.history or state.history[-1]["step"] != state.step):
        _evaluate(run, state, evaluate, None)
    if cfg.gradient_checkpointing:  # a setting of this run, not of the model it leaves behind
        set_activation_checkpointing(run.acc.unwrap_model(run.model), False, desc)
    wall = state.elapsed + time.time() - state.t0
    return TrainResult(steps=state.step, tokens=state.tokens, flops=state.flops, wall_seconds=wall,
                       history=state.history, stopped_early=state.stopped_early, final_loss=state.last_loss,
                       full_state_dict=_full_state_dict(run), eval_flops=state.eval_flops)


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
    stop_after_step: Optional[Callable[[dict[str, float]], bool]] = None,
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
    `stop_after_step(logs)`: a stop rule on each step's loss logs (a method's own, e.g. LLMU's
    forget-loss bound); True ends training after that step (the main process's answer counts).
    """
    seed_everything(seed)
    run = _prepare(model, params, cfg, accelerator or make_accelerator(cfg), desc)
    if on_start is not None:  # before a resume point's weights replace the starting ones
        with torch.no_grad():
            on_start(run.acc.unwrap_model(run.model), streams)
    state = _load_resume_point(run.acc, resume_dir)
    _check_micro_batches(cfg, run.acc.num_processes, desc)
    state.t0 = time.time()
    if state.step == 0 and cfg.eval_every and _evaluate(run, state, evaluate, should_stop):
        state.stopped_early = True
    progress = _Progress(cfg, desc, state, run.acc.is_main_process)
    run.model.train()
    while state.step < cfg.steps and not state.stopped_early:
        logs = _train_step(run, state, loss_fn, streams, cfg, step_hook, desc)
        progress.update(state.step, state.last_loss, logs)
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
            state.stopped_early = _evaluate(run, state, evaluate, should_stop)
        if stop_after_step is not None and not state.stopped_early and distributed.broadcast(stop_after_step(logs)):
            state.stopped_early = True
        if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < cfg.steps
                and not state.stopped_early):
            _save_resume_point(run.acc, resume_dir, state)
    progress.close()
    return _finish(run, state, cfg, streams, evaluate, on_end, desc)
