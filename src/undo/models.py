"""Models: tiny HF causal LMs built from a named preset, or any HF causal LM from a directory.

Everything is a plain `transformers` model: checkpoints are written with
`save_pretrained` (safetensors) and load anywhere with `AutoModelForCausalLM`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .errors import UndoError
from .tokenization import load_tokenizer

# name -> (architecture, config kwargs, what it is for). Vocabulary size comes from the tokenizer.
PRESETS: dict[str, tuple[str, dict[str, Any], str]] = {
    "tiny": ("llama", dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4), "~1M params, Llama; CPU default"),
    "tiny-gemma2": ("gemma2", dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4, head_dim=32),
                    "~1M params, Gemma-2; CPU"),
    "small": ("llama", dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                            num_attention_heads=8, num_key_value_heads=8), "~5M params, Llama; CPU/GPU"),
    "small-gemma2": ("gemma2", dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                    num_attention_heads=8, num_key_value_heads=8, head_dim=32),
                     "~5M params, Gemma-2"),
    # The paper's shapes (reference/undo-paper.md): Gemma-2, 14 layers.
    "gemma2-0.1b": ("gemma2", dict(hidden_size=320, intermediate_size=1280, num_hidden_layers=14,
                                   num_attention_heads=8, num_key_value_heads=8, head_dim=40),
                    "paper's language model shape (with a 256k vocabulary ~0.1B)"),
    "gemma2-0.3b": ("gemma2", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=14,
                                   num_attention_heads=12, num_key_value_heads=12, head_dim=64),
                    "paper's arithmetic model shape (with a 256k vocabulary ~0.3B)"),
}


@dataclasses.dataclass
class ModelConfig:
    """Which model: a preset built from scratch, or `path` to an existing HF checkpoint."""

    preset: str = "tiny"
    path: Optional[str] = None
    max_position_embeddings: int = 512
    dtype: str = "float32"  # weights' storage dtype; training autocasts to bf16 on GPU

    def validate(self, where: str) -> None:
        if self.path is None and self.preset not in PRESETS:
            raise UndoError(f"{where}.preset: unknown model preset '{self.preset}'; known: {', '.join(PRESETS)}")


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A randomly initialised model of preset `cfg.preset`, seeded."""
    if cfg.preset not in PRESETS:
        raise UndoError(f"unknown model preset '{cfg.preset}'; known: {', '.join(PRESETS)}")
    arch, kwargs, _ = PRESETS[cfg.preset]
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


def fresh_copy(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """A randomly initialised model with `model`'s exact architecture (Unlearn-and-Distill's student)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(model.config)
    return student.to(dtype=next(model.parameters()).dtype)


def load_model(path: str | Path, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any HF causal LM + its tokenizer from a local directory (never the network)."""
    path = Path(path)
    if not path.exists():
        raise UndoError(f"model path {path} does not exist; give a checkpoint directory (e.g. runs/<name>/base/model)")
    if not (path / "config.json").exists():
        raise UndoError(f"{path} has no config.json; it is not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise UndoError(f"{path}: unreadable config.json ({type(e).__name__}: {e})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype or torch.float32)
    except ValueError:
        raise UndoError(f"{path}: model type '{config.model_type}' is not a causal language model; undo needs a *ForCausalLM checkpoint") from None
    except Exception as e:
        raise UndoError(f"{path}: cannot load the model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    tokenizer = load_tokenizer(path)
    return model, tokenizer


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    seen, total = set(), 0
    for p in model.parameters():  # parameters() already de-duplicates tied weights
        if trainable_only and not p.requires_grad:
            continue
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def non_embedding_params(model: PreTrainedModel) -> int:
    """Parameters that do matmul work per token (embedding lookups are free; a tied
    output head is counted once through the embedding matrix)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    total = count_params(model) - emb.numel()
    if head is not None and head.weight is emb:
        total += emb.numel()  # the tied head does a full matmul
    return total
