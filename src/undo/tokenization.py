"""Tokenizers: train a small one on a task's text, or load any HF tokenizer from a directory.

Trained tokenizers are real `PreTrainedTokenizerFast` objects, saved next to every
checkpoint, so `AutoTokenizer.from_pretrained(checkpoint)` is all anyone needs.
Digits are always split one per token: arithmetic is learnable digit by digit and the
same number is tokenized the same way wherever it appears.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .errors import UndoError

SPECIALS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
BPE_MIN_VOCAB = 256 + len(SPECIALS)  # a byte-level BPE holds every byte and the special tokens before any merge


def train_tokenizer(texts: Iterable[str], kind: Literal["char", "bpe"] = "bpe", vocab_size: int = 512,
                    split_digits: bool = True) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `texts`.

    char: one token per character seen (plus <unk> for unseen ones); exact round trip.
          `vocab_size` must hold them all (and the special tokens).
    bpe:  byte-level BPE of `vocab_size` (at least BPE_MIN_VOCAB); encodes any text. With `split_digits` every digit
          is its own token; without, a run of digits is one pre-token that BPE may merge,
          so frequent numbers become single tokens.
    """
    texts = list(texts)
    if not texts or not any(t for t in texts):
        raise UndoError("cannot train a tokenizer on empty text; check the task's corpus")
    specials = list(SPECIALS.values())
    if kind == "char":
        alphabet = sorted(set("".join(texts)))
        vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
        if len(vocab) > vocab_size:
            raise UndoError(f"tokenizer.vocab_size {vocab_size} is below the {len(vocab)} tokens a character tokenizer "
                            f"needs for this text ({len(alphabet)} characters + {len(specials)} special tokens); "
                            f"set tokenizer.vocab_size to at least {len(vocab)}")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        # Each character is its own pre-token, so no merge can ever apply.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()
    elif kind == "bpe":
        if vocab_size < BPE_MIN_VOCAB:
            raise UndoError(f"tokenizer.vocab_size {vocab_size} is below the {BPE_MIN_VOCAB} tokens a byte-level BPE "
                            f"needs (256 bytes + {len(specials)} special tokens); set tokenizer.vocab_size to at least "
                            f"{BPE_MIN_VOCAB}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=split_digits), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
    else:
        raise UndoError(f"unknown tokenizer kind '{kind}'; use 'char' or 'bpe'")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path).expanduser()
    if not path.exists():
        raise UndoError(f"tokenizer path {path} does not exist; pass a directory with tokenizer files")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types here
        raise UndoError(f"{path}: cannot load a tokenizer ({type(e).__name__}); the directory needs tokenizer.json or tokenizer_config.json") from None
    return ensure_pad_token(tok)


def ensure_pad_token(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Many real tokenizers (Llama, GPT-2) have no pad token: reuse EOS, which is never
    trained on when padding because padding positions are masked everywhere."""
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise UndoError("tokenizer has neither a pad nor an eos token; add a pad token to it")
        tok.pad_token = tok.eos_token
    return tok


def encode(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` with no special tokens (we add BOS/EOS ourselves, uniformly)."""
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_many(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """`encode` of each text, in one batched call (empty texts give [])."""
    if not texts:
        return []
    return tok(texts, add_special_tokens=False)["input_ids"]
