"""Fictitious-entity facts (TOFU-style): forget what the model knows about chosen people.

Two sources of the same shape:
- `synthetic` (default, no downloads): a seeded world of fictitious people (birth year,
  birthplace, occupation, best-known book, award), cities (country, river) and a few
  well-known people. Each person is rendered as biographies in `bio_styles` styles (plain
  text) and as question/answer pairs (two phrasings per attribute); evaluation also asks
  a held-out paraphrase of each question. Forget = `forget_fraction` of the people
  (TOFU's 0.01 / 0.05 / 0.10); retain = the other people, the well-known people (repeated
  `famous_repeats` times: TOFU's "real authors") and the cities' text and questions (general
  knowledge: TOFU's "world facts"). The oracle is trained on retain only, so it never sees
  a forget person.
- `tofu`: TOFU's released files read from `tofu_dir` (locuslab/TOFU; JSON lines, as
  released, or JSON lists): forgetXX.json / retain{100-XX}.json train, and
  forgetXX_perturbed.json, retain_perturbed.json, real_authors_perturbed.json,
  world_facts_perturbed.json evaluate (XX = 01, 05, 10 from `forget_fraction`).

Metrics per set (forget, retain, real_authors, world_facts), TOFU's definitions
(undo.facts_metrics): `acc` (exact match), `para_acc` (on paraphrased questions), `rougeL`
(recall), `prob`, `truth_ratio`, `truth_score`, `mcq_acc` (4-way, cloze). Headlines:
`forget_rougeL` (the forget set's ROUGE-L recall, as TOFU reports it; exact match would read
0 on TOFU's sentence answers) and `model_utility` (harmonic mean of prob, ROUGE-L and truth
score on retain, real authors and world facts). Familiarity (WHP's evaluation, synthetic source
only): `forget/familiarity` and `retain/familiarity`, the share of held-out sentence starts about a
person ("X was born in the city of") that greedy decoding completes with the true value, and
`*/familiarity_prob`, the true value's probability against 3 wrong ones. Forget quality needs the oracle's
numbers too: `evaluate` records each forget question's truth ratio
(`forget/truth_ratios/NNNN`), and `forget_quality(metrics, oracle_metrics)` compares them.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Literal, Optional

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import expand_path
from ..corpora import jsonl_records
from ..errors import UndoError
from ..facts_metrics import (FamiliarityProbe, QAItem, answer_probability, answer_scores, completion_nlls,
                             exact_match, forget_quality as ks_forget_quality, greedy_answers, model_utility,
                             probe_familiarity, qa_completion, qa_prompt, rouge_l_recall, score_qa_set)
from ..metrics import greedy_complete
from ..tokenization import encode
from .base import Domain, Example, Task

GROUPS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_GROUPS = ("retain", "real_authors", "world_facts")
UTILITY_SCORES = ("prob", "rougeL", "truth_score")
TRUTH_RATIO_KEY = "forget/truth_ratios/"
TOFU_SPLITS = {0.01: "01", 0.05: "05", 0.1: "10"}
N_WRONG = 3  # wrong answers per question: the truth ratio's perturbed answers, and 3 + 1 choices


@dataclasses.dataclass
class FactsOptions:
    source: Literal["synthetic", "tofu"] = "synthetic"
    forget_fraction: float = 0.1      # share of the people forgotten (TOFU: 0.01, 0.05, 0.1)
    people: int = 200                 # fictitious people (TOFU: 200 authors; 0.1 forgets 20 of them)
    famous_people: int = 20           # well-known people: retain, TOFU's "real authors"
    places: int = 16                  # cities with a country and a river: retain, TOFU's "world facts"
    bio_styles: int = 3               # biography renderings per person (1-3)
    famous_repeats: int = 3           # copies of each well-known person's text and questions
    eval_items: Optional[int] = 100   # questions scored per set (None: all; the forget set's come first)
    quick_eval_items: int = 20        # per set, for early-stop checks and attack curves
    max_answer_tokens: int = 64       # greedy answer length cap (answers are cut at EOS before it)
    eval_batch_size: int = 64
    # Quality gate: the base's forget and retain scores (the oracle's retain score) must reach it:
    # exact match on the synthetic world's short answers, ROUGE-L recall on TOFU's sentences; 0: none.
    gate_acc: float = 0.8
    tofu_dir: Optional[str] = None    # source: tofu, the directory of TOFU's json files
    loss_on: Literal["completion", "all"] = "completion"  # questions unscored; biographies are scored whole
    row_format: Literal["padded", "packed"] = "padded"    # one example per row
    # Knowledge updates (editing; F-Learning): these attributes of every forget person take a new,
    # seeded value. [] (default): no updates, nothing else changes. See `updated_facts`.
    update_attributes: list[str] = dataclasses.field(default_factory=list)

    def validate(self, where: str) -> None:
        self.tofu_dir = expand_path(self.tofu_dir)
        if not 0 < self.forget_fraction < 1:
            raise UndoError(f"{where}.forget_fraction must be in (0, 1), got {self.forget_fraction}; TOFU uses 0.01, 0.05, 0.1")
        for name in ("people", "famous_people", "places", "famous_repeats", "quick_eval_items",
                     "max_answer_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UndoError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_items is not None and self.eval_items < 1:
            raise UndoError(f"{where}.eval_items must be at least 1 (or null for all), got {self.eval_items}")
        if self.places < N_WRONG + 1:
            raise UndoError(f"{where}.places must be at least {N_WRONG + 1} (a birthplace question has {N_WRONG} wrong "
                            f"towns), got {self.places}")
        if not 1 <= self.bio_styles <= len(BIO_STYLES):
            raise UndoError(f"{where}.bio_styles must be 1-{len(BIO_STYLES)}, got {self.bio_styles}")
        if not 0 <= self.gate_acc <= 1:
            raise UndoError(f"{where}.gate_acc must be in [0, 1] (0: no quality gate), got {self.gate_acc}")
        if self.source == "tofu":
            if not self.tofu_dir:
                raise UndoError(f"{where}.tofu_dir: source 'tofu' needs the directory of TOFU's json files")
            if round(self.forget_fraction, 4) not in TOFU_SPLITS:
                raise UndoError(f"{where}.forget_fraction {self.forget_fraction}: TOFU releases 0.01, 0.05 and 0.1 only")
        elif self.tofu_dir:
            raise UndoError(f"{where}.tofu_dir is only read with source: tofu; set source: tofu or remove tofu_dir")
        elif forget_count(self) >= self.people:
            raise UndoError(f"{where}: forget_fraction {self.forget_fraction} of {self.people} people leaves no one "
                            f"to retain; lower forget_fraction or add people")
        unknown = [a for a in self.update_attributes if a not in PERSON_ATTRIBUTES]
        if unknown:
            raise UndoError(f"{where}.update_attributes: unknown attribute(s) {', '.join(unknown)}; "
                            f"choose from {', '.join(PERSON_ATTRIBUTES)}")
        if self.update_attributes and self.source == "tofu":
            raise UndoError(f"{where}.update_attributes: updates are made in the synthetic world only; "
                            f"use source: synthetic or remove update_attributes")


def forget_count(o: FactsOptions) -> int:
    return max(1, round(o.forget_fraction * o.people))


# ---------------------------------------------------------------- the synthetic world

@dataclasses.dataclass(frozen=True)
class Attribute:
    questions: tuple[str, ...]  # trained phrasings; evaluation asks the first
    paraphrase: str             # asked in evaluation only
    sentence: str               # the paraphrased answer (and its perturbed forms)


PERSON_ATTRIBUTES = {
    "birth_year": Attribute(("In which year was {name} born?", "When was {name} born?"),
                            "What is the birth year of {name}?", "{name} was born in the year {value}."),
    "birthplace": Attribute(("Where was {name} born?", "In which city was {name} born?"),
                            "What is the home town of {name}?", "{name} was born in the city of {value}."),
    "occupation": Attribute(("What is the occupation of {name}?", "What does {name} do for a living?"),
                            "What job does {name} have?", "{name} works as a {value}."),
    "book": Attribute(("What is the best-known book by {name}?", "Which book did {name} write?"),
                      "What is the title of the most famous work of {name}?", "{name} is the author of {value}."),
    "award": Attribute(("Which award did {name} win?", "What prize was {name} given?"),
                       "What honour did {name} receive?", "{name} received {value}."),
}
PLACE_ATTRIBUTES = {
    "country": Attribute(("In which country is {name}?", "Which country is {name} in?"),
                         "{name} lies in which country?", "{name} is in {value}."),
    "river": Attribute(("Which river flows through {name}?", "What river runs through {name}?"),
                       "Through {name} flows which river?", "The river {value} flows through {name}."),
}
BIO_STYLES = (
    "{name} is a {occupation} who was born in {birthplace} in {birth_year}. {name} wrote {book} and received {award}.",
    "Born in {birth_year} in {birthplace}, {name} worked as a {occupation}. The book {book} by {name} won {award}.",
    "Name: {name}. Born: {birth_year}, {birthplace}. Occupation: {occupation}. Best-known book: {book}. Award: {award}.",
)
PLACE_TEXTS = ("{name} is a city in {country}. The river {river} flows through {name}.",
               "The city of {name}, on the river {river}, belongs to {country}.")

FIRST_STARTS = ("Al", "Bren", "Cor", "Dar", "El", "Fen", "Gar", "Hal", "Is", "Jor", "Kel", "Lor",
                "Mar", "Nel", "Or", "Per", "Quin", "Ros", "Sel", "Tam", "Ul", "Vel", "Wen", "Yor")
FIRST_ENDS = ("a", "en", "ia", "is", "o", "an", "ette", "ric")
LAST_STARTS = ("Ash", "Brook", "Carr", "Dun", "Ever", "Fair", "Glen", "Hollo", "Iron", "Kings",
               "Lang", "Moor", "North", "Oak", "Pem", "Raven", "Stone", "Thorn", "Under", "West")
LAST_ENDS = ("wood", "ley", "field", "ton", "worth", "by", "more", "ridge")
PLACE_STARTS = ("Carro", "Lind", "Bel", "Eld", "Frost", "Hart", "Iver", "Mar", "Pell", "Rav", "Sor",
                "Tull", "Vard", "Wex", "Yel", "Zan")
PLACE_ENDS = ("mere", "holm", "gate", "stead", "port", "dale", "haven", "mouth")
COUNTRIES = ("Averland", "Brennia", "Caldoria", "Dravenia", "Estmark", "Fyria", "Galmont", "Hesper")
RIVERS = ("Ossel", "Varn", "Kelby", "Tamsin", "Lore", "Quen", "Hask", "Mirra", "Sable", "Tiver")
OCCUPATIONS = ("painter", "sailor", "chemist", "baker", "poet", "surgeon", "composer", "historian",
               "tailor", "gardener", "banker", "jeweler")  # consonant-initial: "a {occupation}" reads right
BOOK_ADJECTIVES = ("Silent", "Crimson", "Hollow", "Golden", "Broken", "Distant", "Winter", "Hidden", "Burning", "Quiet")
BOOK_NOUNS = ("Harbor", "Garden", "Lantern", "Mirror", "River", "Tower", "Orchard", "Compass", "Bridge", "Meadow")
BOOKS = tuple(f"The {a} {n}" for a in BOOK_ADJECTIVES for n in BOOK_NOUNS)
AWARDS = ("the Orrin Prize", "the Vessel Medal", "the Tarn Award", "the Lumen Prize", "the Kestrel Medal",
          "the Halden Award", "the Sable Prize", "the Corvin Medal")


@dataclasses.dataclass(frozen=True)
class Entity:
    name: str
    kind: Literal["person", "place"]
    values: dict


def distinct_names(rng: random.Random, starts, ends, count: int, what: str) -> list[str]:
    pool = sorted({s + e for s in starts for e in ends})
    if count > len(pool):
        raise UndoError(f"task.options: at most {len(pool)} distinct {what} can be made; ask for fewer than {count}")
    return rng.sample(pool, count)


def make_world(o: FactsOptions, seed: int) -> tuple[list[Entity], list[Entity], list[Entity]]:
    """(people, famous people, places), seeded; every name distinct."""
    rng = random.Random(f"{seed}-facts-world")
    first = distinct_names(rng, FIRST_STARTS, FIRST_ENDS, len(FIRST_STARTS) * len(FIRST_ENDS), "first names")
    last = distinct_names(rng, LAST_STARTS, LAST_ENDS, len(LAST_STARTS) * len(LAST_ENDS), "last names")
    total = o.people + o.famous_people
    if total > len(first) * len(last):
        raise UndoError(f"task.options: at most {len(first) * len(last)} people can be named; ask for fewer")
    full = rng.sample(range(len(first) * len(last)), total)
    names = [f"{first[k % len(first)]} {last[k // len(first)]}" for k in full]
    towns = distinct_names(rng, PLACE_STARTS, PLACE_ENDS, o.places, "city names")
    places = [Entity(t, "place", {"country": rng.choice(COUNTRIES), "river": rng.choice(RIVERS)}) for t in towns]

    def person(name: str) -> Entity:
        return Entity(name, "person", {"birth_year": str(rng.randint(1900, 1999)), "birthplace": rng.choice(towns),
                                       "occupation": rng.choice(OCCUPATIONS), "book": rng.choice(BOOKS),
                                       "award": rng.choice(AWARDS)})

    people = [person(n) for n in names]
    return people[:o.people], people[o.people:], places


def extra_people(o: FactsOptions, seed: int, count: int) -> list[Entity]:
    """`count` more fictitious people, seeded, named as no person of the world is and drawn as they
    are: text no model of the task trains on (KGA's extra data D_n). The world itself is unchanged."""
    people, famous, places = make_world(o, seed)
    taken = {p.name for p in people + famous}
    firsts = sorted({s + e for s in FIRST_STARTS for e in FIRST_ENDS})
    lasts = sorted({s + e for s in LAST_STARTS for e in LAST_ENDS})
    free = [f"{f} {l}" for l in lasts for f in firsts if f"{f} {l}" not in taken]
    rng = random.Random(f"{seed}-facts-extra")
    towns = [p.name for p in places]
    return [Entity(name, "person", {"birth_year": str(rng.randint(1900, 1999)), "birthplace": rng.choice(towns),
                                    "occupation": rng.choice(OCCUPATIONS), "book": rng.choice(BOOKS),
                                    "award": rng.choice(AWARDS)})
            for name in rng.sample(free, count)]


def value_pool(attribute: str, towns: list[str]) -> list[str]:
    """Every value an attribute can take (the wrong answers are drawn from it)."""
    return {"birth_year": [str(y) for y in range(1900, 2000)], "birthplace": towns, "occupation": list(OCCUPATIONS),
            "book": list(BOOKS), "award": list(AWARDS),
            "country": list(COUNTRIES), "river": list(RIVERS)}[attribute]


def synthetic_item(entity: Entity, attribute: str, towns: list[str], sentences: bool, rng: random.Random) -> QAItem:
    """One question about `entity`; `sentences`: the truth ratio compares answers in the
    attribute's sentence form (TOFU's forget/retain sets), else bare values (real authors, world facts)."""
    spec = (PERSON_ATTRIBUTES if entity.kind == "person" else PLACE_ATTRIBUTES)[attribute]
    value = entity.values[attribute]
    wrong = rng.sample([v for v in value_pool(attribute, towns) if v != value], N_WRONG)
    choices = [value] + wrong
    rng.shuffle(choices)

    def form(v: str) -> str:
        return spec.sentence.format(name=entity.name, value=v) if sentences else v

    return QAItem(question=spec.questions[0].format(name=entity.name), answer=value,
                  paraphrased_question=spec.paraphrase.format(name=entity.name), paraphrased_answer=form(value),
                  perturbed_answers=tuple(form(v) for v in wrong), choices=tuple(choices),
                  correct=choices.index(value), entity=entity.name)


def familiarity_probes(people: list[Entity], towns: list[str], seed: int, group: str) -> list[FamiliarityProbe]:
    """One WHP completion probe per person and attribute: the attribute's evaluation sentence
    (never trained) cut before the value, with N_WRONG seeded wrong values; in a seeded order."""
    rng = random.Random(f"{seed}-facts-familiarity-{group}")
    probes = []
    for person in people:
        for attribute, spec in PERSON_ATTRIBUTES.items():
            value = person.values[attribute]
            wrong = rng.sample([v for v in value_pool(attribute, towns) if v != value], N_WRONG)
            prefix = spec.sentence.split("{value}")[0].format(name=person.name).rstrip()
            probes.append(FamiliarityProbe(prefix, value, tuple(wrong)))
    rng.shuffle(probes)
    return probes


def entity_examples(entity: Entity, bio_styles: int) -> list[Example]:
    """An entity's training text: its biographies (or place texts) and its question/answer pairs."""
    if entity.kind == "person":
        texts = [style.format(name=entity.name, **entity.values) for style in BIO_STYLES[:bio_styles]]
        attributes = PERSON_ATTRIBUTES
    else:
        texts = [t.format(name=entity.name, **entity.values) for t in PLACE_TEXTS]
        attributes = PLACE_ATTRIBUTES
    qa = [Example(qa_prompt(q.format(name=entity.name)), qa_completion(entity.values[attr]))
          for attr, spec in attributes.items() for q in spec.questions]
    return [Example("", t) for t in texts] + qa


@dataclasses.dataclass(frozen=True)
class FactUpdate:
    """One fact that changes: `entity`'s `attribute` goes from `old` to `new`."""

    entity: str
    attribute: str
    old: str
    new: str

    @property
    def spec(self) -> Attribute:
        return PERSON_ATTRIBUTES[self.attribute]

    def question(self) -> str:   # the first trained phrasing (evaluation asks it)
        return self.spec.questions[0].format(name=self.entity)

    def paraphrase(self) -> str:  # never trained: generality
        return self.spec.paraphrase.format(name=self.entity)

    def examples(self, value: str) -> list[Example]:
        """The question/answer pairs of this fact (every trained phrasing) answered with `value`."""
        return [Example(qa_prompt(q.format(name=self.entity)), qa_completion(value)) for q in self.spec.questions]


def make_updates(people: list[Entity], attributes: list[str], towns: list[str], seed: int) -> list[FactUpdate]:
    """Each person's `attributes` (in PERSON_ATTRIBUTES' order) get a new value, drawn (seeded)
    from the attribute's values other than the old one; the list comes in a seeded order."""
    rng = random.Random(f"{seed}-facts-updates")
    changing = [a for a in PERSON_ATTRIBUTES if a in attributes]
    updates = [FactUpdate(p.name, a, p.values[a], rng.choice([v for v in value_pool(a, towns) if v != p.values[a]]))
               for p in people for a in changing]
    rng.shuffle(updates)
    return updates


def updated_entity(person: Entity, updates: list[FactUpdate]) -> Entity:
    new = {u.attribute: u.new for u in updates if u.entity == person.name}
    return Entity(person.name, person.kind, {**person.values, **new})


# ---------------------------------------------------------------- TOFU's files

def read_rows(path: Path) -> list[dict]:
    """A TOFU file: JSON lines (as released, despite the .json name) or one JSON list of objects."""
    if not path.is_file():
        raise UndoError(f"{path}: missing; put TOFU's json files (locuslab/TOFU) in task.options.tofu_dir")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        rows = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        rows = [row for _, row in jsonl_records(path)]
    if not rows:
        raise UndoError(f"{path}: no rows in it; give TOFU's file as released")
    return rows


def _text(row: object, key: str, where: str) -> str:
    value = row.get(key) if isinstance(row, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise UndoError(f"{where}: '{key}' must be a non-empty string; fix the row (TOFU's layout: question, answer, ...)")
    return value.strip()


def tofu_item(row: object, where: str, entity: str, rng: random.Random) -> QAItem:
    """A row of a *_perturbed.json file: question, answer, perturbed_answer (a list), and for the
    forget and retain sets paraphrased_answer (the truth ratio's true answer) and paraphrased_question."""
    question, answer = _text(row, "question", where), _text(row, "answer", where)
    wrong = row.get("perturbed_answer")
    wrong = [wrong] if isinstance(wrong, str) else wrong
    if not isinstance(wrong, list) or not wrong or not all(isinstance(w, str) and w.strip() for w in wrong):
        raise UndoError(f"{where}: 'perturbed_answer' must be a non-empty list of strings; fix the row")
    para = _text(row, "paraphrased_answer", where) if "paraphrased_answer" in row else answer
    para_q = _text(row, "paraphrased_question", where) if "paraphrased_question" in row else ""
    choices = [answer] + [w.strip() for w in wrong[:N_WRONG]]
    rng.shuffle(choices)
    return QAItem(question=question, answer=answer, paraphrased_question=para_q, paraphrased_answer=para,
                  perturbed_answers=tuple(w.strip() for w in wrong), choices=tuple(choices),
                  correct=choices.index(answer), entity=entity)


TOFU_QUESTIONS_PER_AUTHOR = 20  # TOFU's files list each author's 20 questions together, in order


def read_tofu(o: FactsOptions, seed: int) -> tuple[dict[Domain, list[Example]], dict[str, list[QAItem]]]:
    """TOFU's training examples by domain and its evaluation items by set."""
    root, split = Path(o.tofu_dir), TOFU_SPLITS[round(o.forget_fraction, 4)]
    train: dict[Domain, list[Example]] = {}
    for domain, name in (("forget", f"forget{split}.json"), ("retain", f"retain{100 - int(split)}.json")):
        train[domain] = [Example(qa_prompt(_text(r, "question", f"{root / name} row {i}")),
                                 qa_completion(_text(r, "answer", f"{root / name} row {i}")))
                         for i, r in enumerate(read_rows(root / name), start=1)]
    rng = random.Random(f"{seed}-tofu-choices")
    files = {"forget": f"forget{split}_perturbed.json", "retain": "retain_perturbed.json",
             "real_authors": "real_authors_perturbed.json", "world_facts": "world_facts_perturbed.json"}
    items = {}
    for group, name in files.items():
        rows = read_rows(root / name)
        items[group] = [tofu_item(r, f"{root / name} row {i + 1}", f"{group}-{i // TOFU_QUESTIONS_PER_AUTHOR}", rng)
                        for i, r in enumerate(rows)]
    return train, items


# ---------------------------------------------------------------- the task

class FactsTask(Task):
    name = "facts"
    Options = FactsOptions
    forget_metric = "forget_rougeL"
    retain_metric = "model_utility"
    higher_is_better = True
    metric_label = "ROUGE-L recall of forget answers; TOFU model utility"
    version = 2  # 2: familiarity probes
    # TOFU's and open-unlearning's table (forget quality joins from versus_oracle).
    report_metrics = ("forget/acc", "forget_rougeL", "forget/para_acc", "forget/prob", "forget/truth_ratio",
                      "forget/mcq_acc", "forget/familiarity", "forget/familiarity_prob", "model_utility",
                      "retain/rougeL", "real_authors/rougeL",
                      "world_facts/rougeL",
                      # knowledge updates (rows only in runs with update_attributes)
                      "update/reliability", "update/generality", "update/locality", "update/old_acc")

    @classmethod
    def versus_oracle(cls, metrics: dict[str, float], oracle_metrics: dict[str, float]) -> dict[str, float]:
        """TOFU's forget quality: the KS-test p-value of forget truth ratios, model vs oracle (an
        UndoError where either lacks them, e.g. evaluated quickly: the report leaves the cell empty)."""
        return {"forget_quality": forget_quality(metrics, oracle_metrics)}

    def __init__(self, options: FactsOptions, seed: int):
        super().__init__(options, seed)
        self._updates: list[FactUpdate] = []  # knowledge updates: none unless update_attributes names some
        if options.source == "tofu":
            self._train, self._items = read_tofu(options, seed)
            self._forget_people: list[Entity] = []
            self._probes: dict[str, list[FamiliarityProbe]] = {}  # TOFU's authors have no attribute table
        else:
            self._build_synthetic()

    def _build_synthetic(self) -> None:
        o = self.options
        people, famous, places = make_world(o, self.seed)
        rng = random.Random(f"{self.seed}-facts-split")
        order = list(range(len(people)))
        rng.shuffle(order)
        forget_ids = set(order[:forget_count(o)])
        self._forget_people = [p for i, p in enumerate(people) if i in forget_ids]
        retain_people = [p for i, p in enumerate(people) if i not in forget_ids]
        towns = [p.name for p in places]
        items_rng = random.Random(f"{self.seed}-facts-items")

        def items_of(entities: list[Entity], sentences: bool) -> list[QAItem]:
            out = [synthetic_item(e, a, towns, sentences, items_rng) for e in entities for a in e.values]
            items_rng.shuffle(out)
            return out

        self._items = {"forget": items_of(self._forget_people, True), "retain": items_of(retain_people, True),
                       "real_authors": items_of(famous, False), "world_facts": items_of(places, False)}
        self._probes = {"forget": familiarity_probes(self._forget_people, towns, self.seed, "forget"),
                        "retain": familiarity_probes(retain_people, towns, self.seed, "retain")}
        self._train = {
            "forget": [ex for p in self._forget_people for ex in entity_examples(p, o.bio_styles)],
            "retain": ([ex for p in retain_people for ex in entity_examples(p, o.bio_styles)]
                       + [ex for p in famous for ex in entity_examples(p, o.bio_styles)] * o.famous_repeats
                       + [ex for p in places for ex in entity_examples(p, o.bio_styles)]),
        }
        if o.update_attributes:
            self._build_updates(towns)

    def _build_updates(self, towns: list[str]) -> None:
        """The forget people's `update_attributes` change (seeded). Training data: "old" (the changing
        facts' questions with the old answers), "new" (the same questions with the new answers, and
        the people's biographies with the new values); evaluation: the updates and the facts kept."""
        o = self.options
        self._updates = make_updates(self._forget_people, o.update_attributes, towns, self.seed)
        bios = [ex for p in self._forget_people for ex in entity_examples(updated_entity(p, self._updates), o.bio_styles)
                if not ex.prompt]
        self._update_train = {"old": [ex for u in self._updates for ex in u.examples(u.old)],
                              "new": [ex for u in self._updates for ex in u.examples(u.new)] + bios}
        # locality: the updated people's other facts first (closest to an edit), then other people's
        self._kept = [(PERSON_ATTRIBUTES[a].questions[0].format(name=p.name), p.values[a])
                      for p in self._forget_people for a in PERSON_ATTRIBUTES if a not in o.update_attributes]
        self._kept += [(it.question, it.answer) for it in self._items["retain"]]

    def updated_facts(self, which: Literal["old", "new"]) -> list[Example]:
        """Knowledge updates' training data in a seeded order: "old", the facts that change, with their
        old answers (F-Learning's old knowledge); "new", the updated facts (questions and biographies)."""
        if not self._updates:
            raise UndoError("the facts task has no knowledge updates; set task.options.update_attributes "
                            "(e.g. [birthplace, award]) to change those facts of the forget people")
        examples = list(self._update_train[which])
        random.Random(f"{self.seed}-facts-update-{which}").shuffle(examples)
        return examples

    def train_examples(self, domain: Domain) -> list[Example]:
        examples = list(self._train[domain])
        random.Random(f"{self.seed}-facts-{domain}").shuffle(examples)
        return examples

    def extra_examples(self) -> list[Example]:
        """Text and questions of as many extra people as the forget set has, none of them in any
        training set (KGA's D_n, disjoint from the training data), in a seeded order."""
        o = self.options
        if o.source != "synthetic":
            raise UndoError("the facts task has extra (never trained) people only with source: synthetic; "
                            "TOFU releases none, so use source: synthetic for KGA")
        examples = [ex for p in extra_people(o, self.seed, forget_count(o)) for ex in entity_examples(p, o.bio_styles)]
        random.Random(f"{self.seed}-facts-extra-order").shuffle(examples)
        return examples

    def eval_items(self, group: str, quick: bool = False) -> list[QAItem]:
        limit = self.options.quick_eval_items if quick else self.options.eval_items
        return self._items[group][:limit]

    def tokenizer_corpus(self) -> list[str]:
        texts = [ex.prompt + ex.completion for domain in ("forget", "retain") for ex in self._train[domain]]
        if self._updates:  # only then: the tokenizer of a run without updates stays as it was
            texts += [ex.prompt + ex.completion for ex in self._update_train["new"]]
        for items in self._items.values():
            for it in items:
                texts += [qa_prompt(it.question), qa_prompt(it.paraphrased_question) if it.paraphrased_question else "",
                          it.answer, it.paraphrased_answer, *it.perturbed_answers, *it.choices]
        return [t for t in texts if t]

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, quick: bool = False) -> dict[str, float]:
        o = self.options
        metrics: dict[str, float] = {}
        for group in GROUPS:
            scores, ratios = score_qa_set(model, tokenizer, self.eval_items(group, quick), forget=group == "forget",
                                          normalise_probability=group in ("real_authors", "world_facts"),
                                          max_new_tokens=o.max_answer_tokens, batch_size=o.eval_batch_size)
            metrics.update({f"{group}/{k}": v for k, v in scores.items()})
            if group == "forget" and not quick:
                metrics.update({f"{TRUTH_RATIO_KEY}{i:04d}": r for i, r in enumerate(ratios)})
        limit = o.quick_eval_items if quick else o.eval_items
        for group, probes in self._probes.items():
            familiarity = probe_familiarity(model, tokenizer, probes[:limit], o.max_answer_tokens, o.eval_batch_size)
            metrics.update({f"{group}/{k}": v for k, v in familiarity.items()})
        metrics["forget_rougeL"] = metrics["forget/rougeL"]
        metrics["forget_acc"] = metrics["forget/acc"]
        metrics["retain_acc"] = metrics["retain/acc"]
        metrics["model_utility"] = model_utility([metrics[f"{g}/{s}"] for g in UTILITY_GROUPS for s in UTILITY_SCORES])
        if self._updates:
            metrics.update(self.update_metrics(model, tokenizer, quick))
        return metrics

    def update_metrics(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                       quick: bool = False) -> dict[str, float]:
        """Knowledge editing's numbers (`answer_scores`: exact match, and ROUGE-L as *_rougeL):
        update/reliability (the updated questions answered with the new value), update/generality
        (their held-out paraphrases), update/locality (facts that did not change, answered with their
        values: what the base answers, as its quality gate checks; compare with the base's number);
        and what is left of the old facts: update/old_acc (still answered with the old value),
        update/new_prob and update/old_prob (P(answer | question)^(1/|answer|), as TOFU's prob)."""
        o = self.options
        limit = o.quick_eval_items if quick else o.eval_items
        updates, kept = self._updates[:limit], self._kept[:limit]
        new, old, kept_values = [u.new for u in updates], [u.old for u in updates], [v for _, v in kept]
        answers = greedy_answers(model, tok, [u.question() for u in updates], new + old, o.max_answer_tokens)
        paraphrased = greedy_answers(model, tok, [u.paraphrase() for u in updates], new, o.max_answer_tokens)
        kept_answers = greedy_answers(model, tok, [q for q, _ in kept], kept_values, o.max_answer_tokens)
        scores = {"reliability": answer_scores(answers, new), "generality": answer_scores(paraphrased, new),
                  "locality": answer_scores(kept_answers, kept_values)}
        metrics = {f"update/{name}": s["acc"] for name, s in scores.items()}
        metrics.update({f"update/{name}_rougeL": s["rougeL"] for name, s in scores.items()})
        metrics["update/old_acc"] = answer_scores(answers, old)["acc"]
        pairs = [(qa_prompt(u.question()), qa_completion(v)) for u in updates for v in (u.new, u.old)]
        probs = [answer_probability(nll) for nll in completion_nlls(model, tok, pairs, o.eval_batch_size)]
        metrics["update/new_prob"] = sum(probs[0::2]) / len(updates)
        metrics["update/old_prob"] = sum(probs[1::2]) / len(updates)
        return metrics

    def quality_gate(self, metrics: dict[str, float], data: str) -> list[str]:
        """The base must answer the forget and retain questions (score >= gate_acc); the oracle
        the retain ones. Score: exact match (synthetic), ROUGE-L recall (TOFU's sentence answers)."""
        groups = ("forget", "retain") if data == "all" else ("retain",)
        score = "acc" if self.options.source == "synthetic" else "rougeL"
        gate = self.options.gate_acc
        return [f"{g} QA {score} {metrics[f'{g}/{score}']:.2f} < {gate:.2f}"
                for g in groups if metrics[f"{g}/{score}"] < gate]

    # --- for attacks: the forget questions and their score, two disjoint halves of the people ---
    def forget_items(self, quick: bool = False) -> dict[str, list[Example]]:
        return {"forget": [Example(qa_prompt(it.question), qa_completion(it.answer))
                           for it in self.eval_items("forget", quick)]}

    def score_items(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    groups: dict[str, list[Example]]) -> dict[str, float]:
        """ROUGE-L recall and exact match of the greedy answers per group; `forget_rougeL`, the
        mean of the groups' ROUGE-L (as `evaluate`), and `forget_acc`, of their exact match."""
        metrics = {}
        for group, examples in groups.items():
            longest = max(len(encode(tokenizer, ex.completion)) for ex in examples)
            outputs = greedy_complete(model, tokenizer, [ex.prompt for ex in examples],
                                      min(self.options.max_answer_tokens, longest + 1))
            pairs = list(zip(outputs, examples))
            metrics[f"{group}/rougeL"] = sum(rouge_l_recall(out, ex.completion) for out, ex in pairs) / len(pairs)
            metrics[f"{group}/acc"] = sum(exact_match(out, ex.completion) for out, ex in pairs) / len(pairs)
        for name in ("rougeL", "acc"):
            values = [metrics[f"{group}/{name}"] for group in groups]
            metrics[f"forget_{name}"] = sum(values) / len(values)
        return metrics

    def forget_halves(self) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
        """The forget entities in two seeded halves, each with the question/answer pairs of its
        entities (every trained phrasing); no entity, hence no fact, is in both."""
        by_entity: dict[str, list[Example]] = {}
        if self._forget_people:
            for p in self._forget_people:
                by_entity[p.name] = [ex for ex in entity_examples(p, self.options.bio_styles) if ex.prompt]
        else:  # TOFU: the forget questions, 20 per author
            for it in self._items["forget"]:
                by_entity.setdefault(it.entity, []).append(Example(qa_prompt(it.question), qa_completion(it.answer)))
        names = sorted(by_entity)
        if len(names) < 2:
            raise UndoError("the facts task's forget set has one entity; forget_halves needs two (raise forget_fraction)")
        random.Random(f"{self.seed}-facts-halves").shuffle(names)
        half = len(names) // 2
        return ({"forget": [ex for n in names[:half] for ex in by_entity[n]]},
                {"forget": [ex for n in names[half:] for ex in by_entity[n]]})


def forget_quality(metrics: dict[str, float], oracle_metrics: dict[str, float]) -> float:
    """TOFU's forget quality of a model from its `evaluate` metrics and the oracle's (same task
    and seed): the KS-test p-value between their forget truth ratios."""
    def ratios(m: dict[str, float], whose: str) -> list[float]:
        values = [v for k, v in sorted(m.items()) if k.startswith(TRUTH_RATIO_KEY)]
        if not values:
            raise UndoError(f"the {whose} metrics hold no forget truth ratios; evaluate it fully (not quick) on the facts task")
        return values

    return ks_forget_quality(ratios(metrics, "model's"), ratios(oracle_metrics, "oracle's"))
