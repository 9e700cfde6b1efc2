"""Shared pieces of the benchmarks: a model from a preset or a path, a synthetic batch
stream, and the three workloads (a training step, a distillation step, an RMU step), each
run through `undo.training.train` exactly as the stages run them."""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from undo.data import BatchStream
from undo.methods.base import build_method
from undo.models import PRESETS, load_model, preset_config
from undo.training import TrainConfig, TrainResult, lm_loss, train
from undo.stages.undo import distill_loss_fn

os.environ.setdefault("UNDO_NO_PROGRESS", "1")
WORKLOADS = ("train", "distill", "rmu")
# The real tokenizers' vocabularies: the output head is a large share of small models' cost.
PRESET_VOCAB = {"gemma2": 256_000, "llama": 128_256}


def default_vocab(preset: str) -> int:
    if preset.startswith(("tiny", "small")):
        return 512
    return PRESET_VOCAB.get(PRESETS[preset][0], 32_000)


def make_model(preset: Optional[str], path: Optional[str], vocab: Optional[int], seed: int = 0,
               attn: Optional[str] = None) -> PreTrainedModel:
    """A randomly initialised preset model (fp32 weights; training autocasts to bf16 on
    GPU, as undo does), or the checkpoint at `path`."""
    if path:
        return load_model(path)[0]
    config = preset_config(preset, vocab or default_vocab(preset), max_position_embeddings=4096)
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_config(config, **kwargs)


def synthetic_stream(vocab: int, batch_size: int, seq_len: int, seed: int, rows: int = 0) -> BatchStream:
    """Random tokens, every row full and every token scored (the worst case for memory)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows or 2 * batch_size, seq_len), generator=g)
    return BatchStream({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()},
                       batch_size, seed=seed)


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    return copy.deepcopy(model).eval().requires_grad_(False)


def run_workload(kind: str, model: PreTrainedModel, cfg: TrainConfig, rmu_layer: Optional[int] = None,
                 seed: int = 0) -> TrainResult:
    """`cfg.steps` steps of one workload on `model` (trained in place)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = model.get_input_embeddings().weight.shape[0]
    stream = synthetic_stream(vocab, cfg.batch_size, cfg.seq_len, seed)
    if kind == "train":
        return train(model, lm_loss, {"train": stream}, cfg, seed=seed, desc="bench-train")
    if kind == "distill":
        # UNDO's distillation: the teacher's forward under no_grad, then the student's step.
        teacher = frozen_copy(model).to(device)
        return train(model, distill_loss_fn(teacher, 1.0), {"train": stream}, cfg, seed=seed, desc="bench-distill")
    if kind == "rmu":
        # RMU as its stage runs it: a frozen reference, truncated forwards to layer L, only
        # the chosen MLP down-projections trainable.
        options = {} if rmu_layer is None else {"layer": rmu_layer, "layers": list(range(max(0, rmu_layer - 5), rmu_layer + 1))}
        method = build_method("rmu", options, seed=seed)
        method.attach(reference=frozen_copy(model).to(device))
        method.prepare(model)
        params = method.trainable_parameters(model)
        chosen = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        retain = synthetic_stream(vocab, cfg.batch_size, cfg.seq_len, seed + 1)
        return train(model, method.loss, {"forget": stream, "retain": retain}, cfg, seed=seed, params=params,
                     desc="bench-rmu")
    raise SystemExit(f"unknown workload '{kind}'; choose from {', '.join(WORKLOADS)}")
