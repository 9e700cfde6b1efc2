"""Models: tiny HF causal LMs built from a named preset, or any HF causal LM from a directory.

Everything is a plain `transformers` model: checkpoints are written with
`save_pretrained` (safetensors) and load anywhere with `AutoModelForCausalLM`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from . import ensemble  # registers undo's ensemble model (SISA) with the Auto classes
from .config import expand_path
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
    # Llama-3.2-1B's shape, for GPU throughput and memory benchmarks at the 1B scale.
    "llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=64),
                 "Llama-3.2-1B shape (~1.2B with a 128k vocabulary); GPU"),
}


@dataclasses.dataclass
class ModelConfig:
    """Which model: a preset built from scratch, or `path` to an existing HF checkpoint."""

    preset: str = "tiny"
    path: Optional[str] = None
    max_position_embeddings: int = 512
    dtype: str = "float32"  # weights' storage dtype; training autocasts to bf16 on GPU

    def validate(self, where: str) -> None:
        self.path = expand_path(self.path)
        if self.path is None and self.preset not in PRESETS:
            raise UndoError(f"{where}.preset: unknown model preset '{self.preset}'; known: {', '.join(PRESETS)}")


def preset_config(preset: str, vocab_size: int, max_position_embeddings: int = 512, **token_ids: Any) -> PretrainedConfig:
    """The HF config of model preset `preset` (token ids: pad/bos/eos_token_id)."""
    if preset not in PRESETS:
        raise UndoError(f"unknown model preset '{preset}'; known: {', '.join(PRESETS)}")
    arch, kwargs, _ = PRESETS[preset]
    return AutoConfig.for_model(arch, vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                                tie_word_embeddings=True, **token_ids, **kwargs)


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A randomly initialised model of preset `cfg.preset`, seeded."""
    if cfg.preset not in PRESETS:
        raise UndoError(f"unknown model preset '{cfg.preset}'; known: {', '.join(PRESETS)}")
    config = preset_config(cfg.preset, len(tokenizer), cfg.max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
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


# Encoder families that transformers will also build as "*LMHeadModel" (a BERT with a
# causal mask bolted on): their checkpoints are bidirectional, so next-token use is wrong.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "ernie",
                 "rembert", "roformer", "data2vec-text", "megatron-bert", "xmod", "big_bird", "bert-generation"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def causal_lm_problem(path: Path) -> Optional[str]:
    """Why the directory `path` is not a loadable HF causal LM (None if it looks like one),
    checked from config.json alone so a wrong directory fails before any weights load."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not path.is_dir():
        return f"{path} is not a directory; give a checkpoint directory (with config.json and weights)"
    if not (path / "config.json").exists():
        return f"{path} has no config.json, so it is not a Hugging Face model directory; give a checkpoint saved with save_pretrained"
    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{path}/config.json is not valid JSON ({e}); fix the file or save the model again with save_pretrained"
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not model_type:
        return f"{path}/config.json has no model_type; save the model with save_pretrained so its config names its architecture"
    if model_type in ENCODER_TYPES and not raw.get("is_decoder", False):
        return (f"{path}: model type '{model_type}' is a bidirectional encoder, not a causal language model; "
                f"undo needs a decoder-only *ForCausalLM checkpoint (Llama, Gemma, Qwen, GPT-2, ...)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type != ensemble.MODEL_TYPE:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if model_type not in CONFIG_MAPPING_NAMES:
            return (f"{path}: model type '{model_type}' is unknown to this transformers version; "
                    f"upgrade transformers or check config.json")
        return (f"{path}: model type '{model_type}' is not a causal language model; "
                f"undo needs a decoder-only *ForCausalLM checkpoint (Llama, Gemma, Qwen, GPT-2, ...)")
    if not any((path / name).exists() for name in WEIGHT_FILES):
        return (f"{path} has a config but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                f"save the model with save_pretrained")
    return None


def load_model(path: str | Path, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any HF causal LM + its tokenizer from a local directory (never the network)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UndoError(f"model path {path} does not exist; give a checkpoint directory (e.g. runs/<name>/seed0/base/model)")
    problem = causal_lm_problem(path)
    if problem:
        raise UndoError(problem)
    tokenizer = load_tokenizer(path)  # before the weights: a missing tokenizer fails fast
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype or torch.float32)
    except Exception as e:  # transformers raises many types; keep the first line of its reason
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UndoError(f"{path}: cannot load the model ({type(e).__name__}: {first}); "
                        f"check that the weights match config.json or save the model again") from None
    return model, tokenizer


def count_params(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():  # parameters() already de-duplicates tied weights
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def non_embedding_params(model: PreTrainedModel, trainable_only: bool = False) -> int:
    """Parameters that do matmul work per token (embedding lookups are free; a tied
    output head is counted once through the embedding matrix); `trainable_only`: of those,
    the ones that require grad (they alone get weight gradients)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    counted = (lambda p: p.requires_grad) if trainable_only else (lambda p: True)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and p is not emb and counted(p):
            seen.add(id(p))
            total += p.numel()
    if head is not None and head.weight is emb and counted(emb):
        total += emb.numel()  # the tied head does a full matmul
    return total
