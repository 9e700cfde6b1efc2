"""Arithmetic's `text_fraction`: retain-language text mixed into the arithmetic data."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from undo.config import from_dict
from undo.errors import UndoError
from undo.tasks.arithmetic import ArithmeticOptions, ArithmeticTask
from undo.tasks.language import text_metrics
from undo.tokenization import train_tokenizer

SMALL = dict(examples_per_operation=40, eval_per_format=3, quick_eval_per_format=2)
TEXT = dict(train_documents=30, eval_documents=4, eval_seq_len=64)


def chars(examples):
    return sum(len(ex.prompt) + len(ex.completion) for ex in examples)


def test_text_is_off_by_default():
    task = ArithmeticTask(from_dict(ArithmeticOptions, SMALL, "task.options"), seed=0)
    assert task.options.text_fraction == 0.0
    assert all(ex.prompt for ex in task.train_examples("retain"))  # equations and word problems only
    assert len(task.train_examples("retain")) == 80


def test_text_fraction_mixes_retain_language_text_into_retain_data():
    opts = from_dict(ArithmeticOptions, dict(SMALL, text_fraction=0.75, text=TEXT), "task.options")
    task = ArithmeticTask(opts, seed=0)
    retain, forget = task.train_examples("retain"), task.train_examples("forget")
    text = [ex for ex in retain if ex.prompt == ""]
    arithmetic = [ex for ex in retain if ex.prompt] + forget
    assert text and not any(ex.prompt == "" for ex in forget)  # text is retain data only
    assert len(arithmetic) == 160
    # The base sees retain + forget: text is 75% of its characters (to within one document).
    # 75% text means 3x the arithmetic characters; documents are added until that is reached.
    longest = max(len(ex.completion) for ex in text)
    assert chars(text) >= 3 * chars(arithmetic) > chars(text) - longest
    # The text is the language task's retain (Latin-script) training text, cycled when short.
    source = set(task._text_task.train_texts("retain"))
    assert {ex.completion for ex in text} <= source
    assert len(text) > len(source)  # 30 documents are too few here: they repeat
    corpus = task.tokenizer_corpus()
    assert source <= set(corpus)
    # Deterministic.
    again = ArithmeticTask(from_dict(ArithmeticOptions, dict(SMALL, text_fraction=0.75, text=TEXT), "task.options"), 0)
    assert again.train_examples("retain") == retain


def test_text_fraction_is_validated():
    for bad in (1.0, -0.1):
        with pytest.raises(UndoError, match=r"text_fraction must be in \[0, 1\)"):
            from_dict(ArithmeticOptions, dict(SMALL, text_fraction=bad), "task.options")
    with pytest.raises(UndoError, match=r"task.options.text.source: 'web' is not allowed"):
        from_dict(ArithmeticOptions, dict(SMALL, text_fraction=0.5, text={"source": "web"}), "task.options")


def test_evaluation_reports_text_cross_entropy():
    opts = from_dict(ArithmeticOptions, dict(SMALL, text_fraction=0.5, text=TEXT), "task.options")
    task = ArithmeticTask(opts, seed=0)
    tok = train_tokenizer(task.tokenizer_corpus(), "bpe", vocab_size=320)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=128,
                                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id))
    metrics = task.evaluate(model, tok)
    expected = text_metrics(model, tok, task._text_task.eval_texts("retain"), 64, 32)["ce"]
    assert metrics["text_ce"] == pytest.approx(expected)
    assert "text_ce" not in task.evaluate(model, tok, quick=True)  # quick checks stay arithmetic-only
