"""The language task of the UNDO paper: keep one language, forget another.

The paper retains English (FineWeb-Edu) and forgets Korean (FineWeb-2 kor_Hang); the
base model trains 50/50 on both, the oracle on the retain language only, and the
metric is cross-entropy on held-out text of each. Three sources of text:

- `synthetic` (default, no downloads): two seeded generated languages with the same
  meanings but different script, word order, morphology and vocabulary: a Latin-script
  SVO one (retain) and a Hangul-script SOV one (forget); see `language_grammar`.
- `bundled`: English and Korean built from the `faker` package's locale data (MIT
  licence; `pip install 'undo[text]'`): real names, jobs, companies, slogans, addresses
  and dates of each language in short sentence templates. Real words and scripts, not
  natural prose; nothing is downloaded.
- `files`: your own corpora (txt, jsonl, parquet, a saved `datasets` dataset), e.g.
  FineWeb-Edu and FineWeb-2 kor_Hang as the paper used, read by `undo.corpora`.

Evaluation text is disjoint from training text. Metrics, per language: mean
cross-entropy per token (`*_ce`), perplexity (`*_ppl` = exp ce) and next-token top-1
accuracy (`*_acc`), over non-padding tokens of rows packed as in training.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal, Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import expand_path
from ..corpora import check_encodes, check_seq_len, read_corpus
from ..data import pack, tokenize_example
from ..errors import UndoError
from ..metrics import completion_ce, model_device, token_logprobs
from .base import Domain, Example, Task
from .language_grammar import HANGUL_BASE, synthetic_languages

Source = Literal["synthetic", "bundled", "files"]


@dataclasses.dataclass
class LanguageOptions:
    source: Source = "synthetic"
    train_documents: int = 8000       # per language (files: read at most this many)
    eval_documents: int = 200         # held-out documents per language
    quick_eval_documents: int = 32    # subset for early-stop checks
    eval_seq_len: int = 128           # evaluation rows, packed like training rows
    eval_batch_size: int = 32
    # source: files
    retain_files: list[str] = dataclasses.field(default_factory=list)
    forget_files: list[str] = dataclasses.field(default_factory=list)
    retain_eval_files: list[str] = dataclasses.field(default_factory=list)  # default: hold out from *_files
    forget_eval_files: list[str] = dataclasses.field(default_factory=list)
    text_field: str = "text"                   # jsonl field / parquet or dataset column
    txt_mode: Literal["line", "file"] = "line"  # .txt: one document per line, or per file
    split: Optional[str] = None                # split of a saved DatasetDict
    max_chars: Optional[int] = None            # per language, training text (tokens are unknown before the tokenizer)

    def validate(self, where: str) -> None:
        for name in ("train_documents", "eval_documents", "quick_eval_documents", "eval_seq_len", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UndoError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_seq_len < 2:
            raise UndoError(f"{where}.eval_seq_len must be at least 2, got {self.eval_seq_len}")
        file_options = ("retain_files", "forget_files", "retain_eval_files", "forget_eval_files")
        for name in file_options:
            setattr(self, name, [expand_path(p) for p in getattr(self, name)])
        if self.source == "files":
            for name in ("retain_files", "forget_files"):
                if not getattr(self, name):
                    raise UndoError(f"{where}.{name}: source 'files' needs at least one file per language "
                                    f"(txt, jsonl, parquet or a saved dataset directory)")
        else:
            for name in file_options:
                if getattr(self, name):
                    raise UndoError(f"{where}.{name} is only read with source: files (now '{self.source}'); "
                                    f"set source: files or remove {name}")


# ---------------------------------------------------------------- sources


def _held_out_and_train(make_eval: Callable[[], str], make_train: Callable[[], str],
                        options: LanguageOptions) -> tuple[list[str], list[str]]:
    """Distinct generated evaluation documents, then training documents minus any copy of them."""
    held_out: list[str] = []
    seen: set[str] = set()
    for _ in range(10 * options.eval_documents):  # bounded: a tiny generator may repeat itself
        if len(held_out) >= options.eval_documents:
            break
        doc = make_eval()
        if doc not in seen:
            seen.add(doc)
            held_out.append(doc)
    train = [doc for doc in (make_train() for _ in range(options.train_documents)) if doc not in seen]
    return held_out, train


def synthetic_texts(options: LanguageOptions, seed: int) -> dict[str, dict[Domain, list[str]]]:
    languages = synthetic_languages(seed)
    out: dict[str, dict[Domain, list[str]]] = {"train": {}, "eval": {}}
    for domain, script in (("retain", "latin"), ("forget", "hangul")):
        eval_rng = random.Random(f"{seed}-{script}-eval")
        train_rng = random.Random(f"{seed}-{script}-train")
        out["eval"][domain], out["train"][domain] = _held_out_and_train(
            lambda: languages.document(script, eval_rng), lambda: languages.document(script, train_rng), options)
    return out


# Hand-written sentence templates, one list per language, saying the same things.
# Korean fields ending in _topic/_object/_as carry the particle their last syllable calls for.
FAKER_TEMPLATES = {
    "en_US": [
        "{name} works at {company} as {job_a}.",
        "{company} is located at {address}.",
        "The slogan of {company} is: {catch_phrase}.",
        "{name} lives at {address}.",
        "The plan of {company} is to {bs}.",
        "{name} was born on {date}.",
        "{name} met {name2} on {date}.",
    ],
    "ko_KR": [
        "{name_topic} {company}에서 {job_as} 일한다.",
        "{company_topic} {address}에 있다.",
        "{company}의 구호는 {catch_phrase}이다.",
        "{name_topic} {address}에 산다.",
        "{company}의 계획은 {bs}이다.",
        "{name_topic} {date}에 태어났다.",
        "{name_topic} {date}에 {name2_object} 만났다.",
    ],
}
RIEUL_FINAL = 8  # ㄹ as a final consonant: (으)로 takes plain 로 after it


def korean_particles(fields: dict[str, str]) -> dict[str, str]:
    """Topic 은/는, object 을/를 and instrumental (으)로 forms, chosen by the final syllable."""
    def final(word: str) -> int:
        code = ord(word[-1]) - HANGUL_BASE
        return code % 28 if 0 <= code < 11172 else 0

    name, company, name2, job = fields["name"], fields["company"], fields["name2"], fields["job"]
    return {
        "name_topic": name + ("은" if final(name) else "는"),
        "company_topic": company + ("은" if final(company) else "는"),
        "name2_object": name2 + ("을" if final(name2) else "를"),
        "job_as": job + ("으로" if final(job) not in (0, RIEUL_FINAL) else "로"),
    }


FAKER_FIELDS = ("name", "company", "job", "address", "catch_phrase", "bs", "date")
MAX_FAKER_POOL = 1000  # values drawn per field; faker's own draws are slow (~0.2 ms), picks from a pool are not


def faker_pools(locale: str, seed: int, size: int) -> dict[str, list[str]]:
    from faker import Faker

    fake = Faker(locale)
    fake.seed_instance(seed)
    return {field: [str(getattr(fake, field)()).replace("\n", ", ") for _ in range(size)] for field in FAKER_FIELDS}


def faker_document(pools: dict[str, list[str]], locale: str, rng: random.Random) -> str:
    """3-8 template sentences filled with one locale's faker data."""
    sentences = []
    for _ in range(rng.randint(3, 8)):
        fields = {field: rng.choice(pool) for field, pool in pools.items()}
        fields["name2"] = rng.choice(pools["name"])
        if locale == "ko_KR":
            fields.update(korean_particles(fields))
        else:
            fields["job_a"] = ("an " if fields["job"][:1].lower() in "aeiou" else "a ") + fields["job"]
        sentences.append(rng.choice(FAKER_TEMPLATES[locale]).format(**fields))
    return " ".join(sentences)


def bundled_texts(options: LanguageOptions, seed: int) -> dict[str, dict[Domain, list[str]]]:
    try:
        import faker  # noqa: F401
    except ModuleNotFoundError:
        raise UndoError("task source 'bundled' needs the faker package (MIT); pip install 'undo[text]', "
                        "or use source: synthetic or files") from None
    out: dict[str, dict[Domain, list[str]]] = {"train": {}, "eval": {}}
    for domain, locale in (("retain", "en_US"), ("forget", "ko_KR")):
        # A document draws ~6 values from each pool; pools of a quarter of the document count
        # keep documents varied while keeping faker's own (slow) draws few.
        size = min(MAX_FAKER_POOL, max(20, (options.train_documents + options.eval_documents) // 4))
        pools = faker_pools(locale, seed, size)
        eval_rng = random.Random(f"{seed}-{locale}-eval")
        train_rng = random.Random(f"{seed}-{locale}-train")
        out["eval"][domain], out["train"][domain] = _held_out_and_train(
            lambda: faker_document(pools, locale, eval_rng), lambda: faker_document(pools, locale, train_rng), options)
    return out


def file_texts(options: LanguageOptions, seed: int) -> dict[str, dict[Domain, list[str]]]:
    out: dict[str, dict[Domain, list[str]]] = {"train": {}, "eval": {}}
    o = options
    for domain in ("retain", "forget"):
        files = getattr(o, f"{domain}_files")
        eval_files = getattr(o, f"{domain}_eval_files")
        if eval_files:
            held_out = read_corpus(eval_files, o.eval_documents, None, o.text_field, o.txt_mode, o.split)
            train = read_corpus(files, o.train_documents, o.max_chars, o.text_field, o.txt_mode, o.split)
        else:
            # Read train + eval documents, then hold out a seeded random subset for evaluation.
            docs = read_corpus(files, o.train_documents + o.eval_documents, None, o.text_field, o.txt_mode, o.split)
            if len(docs) < 2:
                raise UndoError(f"{', '.join(files)}: {len(docs)} document(s) of {domain} text; need at least 2 "
                                f"to hold some out for evaluation (or give {domain}_eval_files)")
            order = list(range(len(docs)))
            random.Random(f"{seed}-{domain}-holdout").shuffle(order)
            n_eval = min(o.eval_documents, len(docs) // 2)
            held_out = [docs[i] for i in sorted(order[:n_eval])]
            train = [docs[i] for i in sorted(order[n_eval:])]
            if o.max_chars is not None:
                train = _first_chars(train, o.max_chars)
        held = set(held_out)
        train = [d for d in train if d not in held]  # duplicates in web text would leak into evaluation
        if not train:
            raise UndoError(f"{', '.join(files)}: no {domain} training text left after holding out evaluation "
                            f"documents; give more text")
        out["train"][domain], out["eval"][domain] = train, held_out
    return out


def _first_chars(docs: list[str], max_chars: int) -> list[str]:
    kept, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        kept.append(d)
        total += len(d)
    return kept


SOURCES = {"synthetic": synthetic_texts, "bundled": bundled_texts, "files": file_texts}


# ---------------------------------------------------------------- metrics


# Evaluation rows by (tokenizer, seq_len, texts): a run evaluates the same texts every
# eval_every steps; each value keeps its tokenizer, so an id is never reused while cached.
_EVAL_ROWS: OrderedDict[tuple, tuple[PreTrainedTokenizerBase, dict[str, torch.Tensor]]] = OrderedDict()
EVAL_ROWS_CACHED = 8


def eval_rows(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int,
              where: str = "evaluation text") -> dict[str, torch.Tensor]:
    """`texts` tokenized and packed into rows of `seq_len` (as in training), once per process
    for the same tokenizer object, texts and seq_len (read-only: do not edit the rows)."""
    key = (id(tokenizer), seq_len, tuple(texts))
    if key in _EVAL_ROWS and _EVAL_ROWS[key][0] is tokenizer:
        _EVAL_ROWS.move_to_end(key)
        return _EVAL_ROWS[key][1]
    check_encodes(tokenizer, texts, where)
    rows = pack([tokenize_example(tokenizer, Example("", t), "all") for t in texts], seq_len, tokenizer.pad_token_id)
    _EVAL_ROWS[key] = (tokenizer, rows)
    while len(_EVAL_ROWS) > EVAL_ROWS_CACHED:
        _EVAL_ROWS.popitem(last=False)
    return rows


@torch.no_grad()
def text_metrics(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                 seq_len: int, batch_size: int = 32, where: str = "evaluation text") -> dict[str, float]:
    """Cross-entropy per token, perplexity and next-token top-1 accuracy on `texts`,
    packed into rows of `seq_len` as in training; padding and BOS are never scored."""
    if not texts:
        raise UndoError(f"{where}: no documents to evaluate on")
    check_seq_len(model, seq_len, "task.options.eval_seq_len")
    rows = eval_rows(tokenizer, texts, seq_len, where)
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_logp, correct, count = 0.0, 0, 0
    for start in range(0, rows["input_ids"].shape[0], batch_size):
        batch = {k: v[start:start + batch_size].to(device) for k, v in rows.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp, mask = token_logprobs(logits, batch["labels"])
        predicted = logits[:, :-1].argmax(dim=-1)
        total_logp += logp.sum().item()
        correct += int(((predicted == batch["labels"][:, 1:]) & mask).sum().item())
        count += int(mask.sum().item())
    model.train(was_training)
    ce = -total_logp / max(count, 1)
    return {"ce": ce, "ppl": math.exp(min(ce, 700.0)), "acc": correct / max(count, 1)}


class LanguageTask(Task):
    name = "language"
    Options = LanguageOptions
    forget_metric = "forget_ce"
    retain_metric = "retain_ce"
    higher_is_better = False
    metric_label = "cross-entropy (nats/token)"

    def __init__(self, options: LanguageOptions, seed: int):
        super().__init__(options, seed)
        texts = SOURCES[options.source](options, seed)
        self._train: dict[Domain, list[str]] = texts["train"]
        self._eval: dict[Domain, list[str]] = texts["eval"]

    def train_texts(self, domain: Domain) -> list[str]:
        return self._train[domain]

    def eval_texts(self, domain: Domain) -> list[str]:
        return self._eval[domain]

    def train_examples(self, domain: Domain) -> list[Example]:
        return [Example("", text) for text in self._train[domain]]

    def tokenizer_corpus(self) -> list[str]:
        return self._train["retain"] + self._train["forget"]

    # --- for attacks: forget documents and their score, two disjoint halves (fewshot, heldout) ---
    def forget_items(self, quick: bool = False) -> dict[str, list[Example]]:
        limit = self.options.quick_eval_documents if quick else None
        return {"forget": [Example("", text) for text in self._eval["forget"][:limit]]}

    def score_items(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    groups: dict[str, list[Example]]) -> dict[str, float]:
        """Cross-entropy per token of each document (the completion) after its prompt, one
        document per row: `forget_ce`, the mean over groups. Unlike `evaluate`'s packed rows, a
        document sees no other document unless its prompt holds some."""
        metrics = {f"{group}/ce": completion_ce(model, tokenizer, examples, loss_on="completion",
                                                batch_size=self.options.eval_batch_size)
                   for group, examples in groups.items()}
        metrics["forget_ce"] = sum(metrics.values()) / len(metrics)
        return metrics

    def forget_halves(self) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
        """The distinct forget training documents in two seeded halves."""
        docs = sorted(set(self._train["forget"]))
        random.Random(f"{self.seed}-forget-halves").shuffle(docs)
        n = len(docs) // 2
        return ({"forget": [Example("", d) for d in docs[:n]]}, {"forget": [Example("", d) for d in docs[n:]]})

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, quick: bool = False) -> dict[str, float]:
        o = self.options
        limit = o.quick_eval_documents if quick else None
        metrics: dict[str, float] = {}
        for domain in ("forget", "retain"):
            scores = text_metrics(model, tokenizer, self._eval[domain][:limit], o.eval_seq_len, o.eval_batch_size,
                                  where=f"{domain} evaluation text")
            for name, value in scores.items():
                metrics[f"{domain}_{name}"] = value
        return metrics
