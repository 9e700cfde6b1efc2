"""MCQ scoring equals lm-evaluation-harness 0.4.13's (its `hf` model, multiple_choice `acc`).

On tiny models and 120 made-up questions, every choice's loglikelihood and every answer are
compared with:
- `reference_loglikelihood`: lm-eval's token rule written out by hand (`HFLM.tok_encode`,
  `_encode_pair`, the left truncation of `_loglikelihood_tokens`), one plain forward pass
  per request; needs no lm-eval;
- the real harness (`simple_evaluate` with `HFLM` on a local copy of its own wmdp_bio task
  config) when it is installed (`pip install -e '.[lmeval]'`), skipped otherwise.
Cases: a tokenizer that adds BOS, one that does not, a Gemma-2 with one that does not (lm-eval
up to 0.4.9.1 added BOS there), and prompts longer than the model's max length.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from undo.cli import main
from undo.models import load_model
from undo.tasks.wmdp import (LETTERS, MCQuestion, encode_pair, first_per_subject, loglikelihoods, max_length,
                             mcq_accuracy, mcq_context, mcq_predictions, mcq_scores)
from undo.tokenization import train_tokenizer

WORDS = ("cell virus gene protein enzyme spore toxin host strain vector membrane plasmid sample agent "
         "culture receptor antibody dose layer signal").split()


def made_up_questions(n: int = 120) -> list[MCQuestion]:
    rng = random.Random(0)
    questions = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30)))  # some exceed a short max length
        choices = tuple(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in LETTERS)
        question = f"  Which {words} is {i}? " if i % 7 == 0 else f"Which {words} is {i}?"  # stripped by the template
        questions.append(MCQuestion(question, choices, rng.randrange(4), "biology"))
    return questions


QUESTIONS = made_up_questions()


@pytest.fixture(scope="module")
def plain_tok():
    """An undo-trained tokenizer: its default adds no special tokens."""
    return train_tokenizer([mcq_context(q) + " A B C D" for q in QUESTIONS], "bpe", vocab_size=400)


@pytest.fixture(scope="module")
def bos_tok(plain_tok):
    """The same vocabulary with a default that prepends BOS, as Llama's and Gemma's tokenizers do."""
    tok = copy.deepcopy(plain_tok)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    return tok


def tiny_model(kind: str, vocab: int, positions: int = 256):
    torch.manual_seed(0)
    shape = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=positions, initializer_range=0.2)
    config = LlamaConfig(**shape) if kind == "llama" else Gemma2Config(**shape, head_dim=8)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


CASES = {  # name: (model kind, tokenizer fixture, max_position_embeddings)
    "llama, tokenizer adds BOS": ("llama", "bos_tok", 256),
    "llama, tokenizer adds none": ("llama", "plain_tok", 256),
    "gemma2, tokenizer adds none": ("gemma2", "plain_tok", 256),
    "llama, prompts past max length": ("llama", "bos_tok", 24),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    kind, tok_name, positions = CASES[request.param]
    tok = request.getfixturevalue(tok_name)
    return tiny_model(kind, len(tok), positions), tok


# ---------------------------------------------------------------- lm-eval's rule, by hand

def lm_eval_tok_encode(tok, text: str) -> list[int]:
    """HFLM.tok_encode(text) with add_bos_token unset: the tokenizer's own default, unless
    the text already starts with the decoded BOS (else EOS) token."""
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return tok.encode(text, add_special_tokens=not text.startswith(tok.decode(prefix)))


@torch.no_grad()
def reference_loglikelihood(model, tok, context: str, continuation: str) -> float:
    spaces = len(context) - len(context.rstrip())  # _encode_pair: trailing spaces go to the continuation
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = lm_eval_tok_encode(tok, context + continuation), lm_eval_tok_encode(tok, context)
    cont = whole[len(ctx):]
    limit = model.config.max_position_embeddings
    inp = (ctx + cont)[-(limit + 1):][:-1]  # _loglikelihood_tokens: keep the end, feed all but the last
    logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].float(), dim=-1)
    return sum(logp[len(inp) - len(cont) + j, token].item() for j, token in enumerate(cont))


def reference_scores(model, tok, questions) -> torch.Tensor:
    return torch.tensor([[reference_loglikelihood(model, tok, mcq_context(q), " " + x) for x in LETTERS]
                         for q in questions])


def test_scores_and_answers_equal_lm_evals_rule_by_hand(case):
    model, tok = case
    ours = mcq_scores(model, tok, QUESTIONS, batch_size=8)
    expected = reference_scores(model, tok, QUESTIONS)
    assert torch.allclose(ours, expected, atol=1e-4)
    assert mcq_predictions(model, tok, QUESTIONS) == expected.argmax(dim=1).tolist()
    assert len(set(expected.argmax(dim=1).tolist())) > 1  # the model does not answer one letter throughout


def test_the_parity_test_would_catch_the_old_rules(plain_tok, bos_tok):
    """undo's old rules (BOS for a Gemma, max_length - 1 input tokens) give other scores here."""
    gemma = tiny_model("gemma2", len(plain_tok))
    old_bos = mcq_scores(gemma, plain_tok, QUESTIONS[:20], add_bos=True)
    assert not torch.allclose(old_bos, reference_scores(gemma, plain_tok, QUESTIONS[:20]), atol=1e-3)
    short = tiny_model("llama", len(bos_tok), positions=24)
    long = [q for q in QUESTIONS if len(bos_tok.encode(mcq_context(q))) > 25][:20]
    assert len(long) == 20 and max_length(short, bos_tok) == 24
    requests = [encode_pair(bos_tok, mcq_context(q), " " + x) for q in long for x in LETTERS]
    old = torch.tensor(loglikelihoods(short, requests, limit=23)).view(-1, 4)
    assert not torch.allclose(old, reference_scores(short, bos_tok, long), atol=1e-3)


# ---------------------------------------------------------------- the real harness

def write_local_task(tmp_path: Path, questions, **changes) -> Path:
    """lm-eval's own wmdp_bio task config, reading a local JSON copy of `questions` (no hub)."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install -e '.[lmeval]'")
    tasks_dir = Path(lm_eval.__file__).parent / "tasks" / "wmdp"
    data = tmp_path / "bio.json"
    data.write_text(json.dumps([{"question": q.question, "choices": list(q.choices), "answer": q.answer}
                                for q in questions]))
    config = {**yaml.safe_load((tasks_dir / "_default_template_yaml").read_text()),
              **yaml.safe_load((tasks_dir / "wmdp_bio.yaml").read_text())}
    config.pop("include")
    config.update(task="undo_parity_bio", dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "cache")})
    config.update(changes)
    (tmp_path / "tasks").mkdir(exist_ok=True)
    (tmp_path / "tasks" / f"{config['task']}.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "tasks"


def harness_run(model, tok, questions, tmp_path: Path, limit=None) -> dict:
    """`simple_evaluate` with lm-eval's `hf` model on the model object, as the harness computes it."""
    tasks = write_local_task(tmp_path, questions)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=["undo_parity_bio"], task_manager=manager, limit=limit,
                                   log_samples=True)


def harness_scores(result: dict) -> torch.Tensor:
    samples = sorted(result["samples"]["undo_parity_bio"], key=lambda s: s["doc_id"])
    return torch.tensor([[resp[0] for resp in s["filtered_resps"]] for s in samples])


def test_scores_answers_and_accuracy_equal_the_real_harness(case, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = case
    result = harness_run(model, tok, QUESTIONS, tmp_path)
    expected = harness_scores(result)
    ours = mcq_scores(model, tok, QUESTIONS, batch_size=8)
    assert expected.shape == (120, 4) and torch.allclose(ours, expected, atol=1e-4)
    predictions = mcq_predictions(model, tok, QUESTIONS)
    assert predictions == expected.argmax(dim=1).tolist()
    accuracy = sum(p == q.answer for p, q in zip(predictions, QUESTIONS)) / len(QUESTIONS)
    assert accuracy == pytest.approx(result["results"]["undo_parity_bio"]["acc,none"])


def test_eval_limit_takes_the_questions_lm_evals_limit_takes(plain_tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_model("llama", len(plain_tok))
    result = harness_run(model, plain_tok, QUESTIONS, tmp_path, limit=7)
    docs = sorted(result["samples"]["undo_parity_bio"], key=lambda s: s["doc_id"])
    assert [d["doc"]["question"] for d in docs] == [q.question for q in first_per_subject(QUESTIONS, 7)]
    assert torch.allclose(harness_scores(result), mcq_scores(model, plain_tok, first_per_subject(QUESTIONS, 7)),
                          atol=1e-4)


# ---------------------------------------------------------------- undo eval --harness

@pytest.fixture()
def saved_model(bos_tok, tmp_path):
    path = tmp_path / "model"
    tiny_model("llama", len(bos_tok)).save_pretrained(path)
    bos_tok.save_pretrained(path)
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_eval_harness_runs_lm_eval_on_a_saved_checkpoint(saved_model, tmp_path, capsys):
    tasks = write_local_task(tmp_path, QUESTIONS)
    args = ["eval", "--harness", "undo_parity_bio", "--limit", "10", "--include-path", str(tasks), "--device", "cpu"]
    assert main([*args, "--json", str(saved_model)]) == 0
    acc = json.loads(capsys.readouterr().out)["undo_parity_bio"]["acc,none"]
    model, tok = load_model(str(saved_model))
    assert tok.encode("Answer:")[0] == tok.bos_token_id  # the saved tokenizer still adds BOS
    assert acc == pytest.approx(mcq_accuracy(model, tok, QUESTIONS[:10]))
    assert main([*args, "--model", str(saved_model)]) == 0
    assert "undo_parity_bio" in capsys.readouterr().out  # lm-eval's table


def test_eval_harness_stays_offline(saved_model, tmp_path, capsys):
    tasks = write_local_task(tmp_path, QUESTIONS[:2], dataset_path="undo-tests/no-such-dataset", dataset_kwargs={})
    assert main(["eval", "--harness", "undo_parity_bio", "--include-path", str(tasks), str(saved_model)]) == 2
    assert "could not load a task's data offline" in one_line_error(capsys)


def test_eval_harness_without_lm_eval_says_how_to_install(saved_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main(["eval", "--harness", "wmdp_bio", "--limit", "5", str(saved_model)]) == 2
    assert "pip install -e '.[lmeval]'" in one_line_error(capsys)


@pytest.mark.parametrize("args,message", [
    (["--harness", " , ", "m"], "give lm-eval task names"),
    (["--harness", "wmdp_bio", "--limit", "0", "m"], "--limit must be at least 1"),
    (["--harness", "wmdp_bio", "--batch-size", "0", "m"], "--batch-size must be at least 1"),
    (["--harness", "wmdp_bio", "--model", "m", "m2"], "give the model once"),
    (["--harness", "wmdp_bio", "--set", "seed=1", "m"], "--set applies to the experiment's task"),
    (["--limit", "5", "--model", "m"], "--limit and --include-path go with --harness"),
    ([], "give the checkpoint with --model DIR"),
])
def test_eval_arguments_are_checked_in_one_line(args, message, capsys):
    assert main(["eval", *args]) == 2
    assert message in one_line_error(capsys)
