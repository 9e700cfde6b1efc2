"""Two seeded synthetic languages that say the same kinds of things in different ways.

One meaning generator draws short stories (documents): a cast of people, animals and
things in a scene, sentences where someone does something to something, with numbers,
adjectives, places, tense and time words. Two renderers turn a meaning into text:

- Latin script, SVO: determiners that track what was mentioned before, plural suffixes
  by noun class that adjectives copy, verbs marked for tense and subject number,
  compound number words, "Det Adj Noun Verb Det Num Adj Noun at Det Place".
- Hangul script, SOV: the real Korean particle rule (subject 이/가, object 을/를 chosen by
  whether the previous syllable ends in a consonant), counters by noun class, an
  honorific verb infix when the subject is a person, tense suffixes, clause chaining.

The lexicons are drawn from the seed, disjoint between the languages (Hangul words are
made of real Hangul syllables, U+AC00..U+D7A3). Time words must agree with verb tense,
verbs choose their subjects and objects by class, a story keeps its cast and tense: a
small model must learn vocabulary, morphology and long-range agreement for each
language, and knowing one language does not give away the other's words.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Optional

CLASSES = ("person", "animal", "thing", "food", "place")
CLASS_SIZES = {"person": 10, "animal": 10, "thing": 14, "food": 10, "place": 8}
ANIMATE = ("person", "animal")
N_VERBS = 24
N_ADJECTIVES = 16
TENSES = ("past", "present", "future")


@dataclasses.dataclass(frozen=True)
class Concepts:
    """The shared meaning inventory: which noun is of which class, what verbs and adjectives fit."""

    noun_class: tuple[str, ...]
    verb_subjects: tuple[tuple[str, ...], ...]
    verb_objects: tuple[tuple[str, ...], ...]
    adjective_classes: tuple[tuple[str, ...], ...]

    def nouns_of(self, classes: tuple[str, ...]) -> list[int]:
        return [i for i, c in enumerate(self.noun_class) if c in classes]


def make_concepts(rng: random.Random) -> Concepts:
    noun_class = tuple(c for c in CLASSES for _ in range(CLASS_SIZES[c]))
    things = ("animal", "thing", "food", "person")
    verb_subjects, verb_objects = [], []
    for v in range(N_VERBS):
        verb_subjects.append(("person",) if v % 3 == 0 else ANIMATE)
        verb_objects.append(tuple(sorted(rng.sample(things, rng.choice((1, 1, 2))))))
    adjective_classes = tuple(tuple(sorted(rng.sample(CLASSES, rng.choice((1, 2, 3))))) for _ in range(N_ADJECTIVES))
    return Concepts(noun_class, tuple(verb_subjects), tuple(verb_objects), adjective_classes)


@dataclasses.dataclass(frozen=True)
class NounPhrase:
    noun: int
    count: int                  # 1..99
    adjective: Optional[int]
    definite: bool              # mentioned before in this story


@dataclasses.dataclass(frozen=True)
class Clause:
    subject: NounPhrase
    verb: int
    obj: NounPhrase
    place: Optional[NounPhrase]


@dataclasses.dataclass(frozen=True)
class Sentence:
    tense: str
    time_word: bool             # starts with a time word that agrees with the tense
    clauses: tuple[Clause, ...]


def _count(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.65:
        return 1
    if r < 0.9:
        return rng.randint(2, 9)
    return rng.randint(10, 99)


def story(concepts: Concepts, rng: random.Random) -> list[Sentence]:
    """One document's meaning: 3-8 sentences about a cast in a scene."""
    c = concepts
    scene = rng.choice(c.nouns_of(("place",)))
    agents = rng.sample(c.nouns_of(ANIMATE), 2)
    props = rng.sample(c.nouns_of(("animal", "thing", "food", "person")), 3)
    tense = rng.choice(TENSES)
    mentioned: set[int] = set()

    def phrase(noun: int, count: Optional[int] = None) -> NounPhrase:
        adjs = [a for a, cls in enumerate(c.adjective_classes) if c.noun_class[noun] in cls]
        adjective = rng.choice(adjs) if adjs and rng.random() < 0.3 else None
        np = NounPhrase(noun, _count(rng) if count is None else count, adjective, noun in mentioned)
        mentioned.add(noun)
        return np

    def pick(cast: list[int], classes: tuple[str, ...]) -> int:
        fitting = [n for n in cast if c.noun_class[n] in classes]
        if fitting and rng.random() < 0.7:
            return rng.choice(fitting)
        return rng.choice(c.nouns_of(classes))

    def clause() -> Clause:
        verb = rng.randrange(N_VERBS)
        subject = phrase(pick(agents, c.verb_subjects[verb]))
        obj = phrase(pick(props, c.verb_objects[verb]))
        place = None
        if rng.random() < 0.3:
            place = phrase(scene if rng.random() < 0.7 else rng.choice(c.nouns_of(("place",))), count=1)
        return Clause(subject, verb, obj, place)

    sentences = []
    for _ in range(rng.randint(3, 8)):
        this_tense = tense if rng.random() < 0.8 else rng.choice(TENSES)
        clauses = (clause(), clause()) if rng.random() < 0.25 else (clause(),)
        sentences.append(Sentence(this_tense, rng.random() < 0.3, clauses))
    return sentences


# ---------------------------------------------------------------- word making

LATIN_ONSETS = "p t k b d g m n l r s v f z h j".split() + [""]
LATIN_VOWELS = list("aeiou")
LATIN_CODAS = [""] * 6 + list("nrsl")
HANGUL_BASE = 0xAC00


def hangul(initial: int, medial: int, final: int) -> str:
    """A precomposed Hangul syllable (19 initials x 21 medials x 28 finals, final 0 = none)."""
    return chr(HANGUL_BASE + (initial * 21 + medial) * 28 + final)


def has_final_consonant(syllable: str) -> bool:
    code = ord(syllable) - HANGUL_BASE
    return 0 <= code < 11172 and code % 28 != 0


def _words(rng: random.Random, syllables: list[str], n: int, lengths: tuple[int, ...], taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        word = "".join(rng.choice(syllables) for _ in range(rng.choice(lengths)))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


@dataclasses.dataclass(frozen=True)
class Lexicon:
    nouns: tuple[str, ...]
    verbs: tuple[str, ...]
    adjectives: tuple[str, ...]
    digits: tuple[str, ...]         # words for 1..9 (index 0 unused)
    ten: str
    time_words: dict[str, str]      # tense -> word
    function: dict[str, str]        # the language's grammatical words and affixes


def latin_lexicon(rng: random.Random) -> Lexicon:
    syllables = sorted({o + v + k for o in LATIN_ONSETS for v in LATIN_VOWELS for k in LATIN_CODAS})
    inventory = rng.sample(syllables, 48)  # a language uses some syllables, not all
    taken: set[str] = set()
    function_names = ("indefinite", "definite", "at", "and", "plural_animate", "plural_other",
                      "past", "future", "plural_verb")
    short = [s for s in syllables if len(s) == 2 and s not in inventory]  # affixes: their own CV syllables
    function = dict(zip(function_names, _words(rng, short, len(function_names), (1,), taken)))
    digits = ("",) + tuple(_words(rng, inventory, 9, (1, 2), taken))
    return Lexicon(
        nouns=tuple(_words(rng, inventory, sum(CLASS_SIZES.values()), (2, 2, 3), taken)),
        verbs=tuple(_words(rng, inventory, N_VERBS, (1, 2, 2), taken)),
        adjectives=tuple(_words(rng, inventory, N_ADJECTIVES, (2, 3), taken)),
        digits=digits,
        ten=_words(rng, short, 1, (1,), taken)[0],
        time_words=dict(zip(TENSES, _words(rng, inventory, 3, (2, 3), taken))),
        function=function,
    )


# Real Korean grammatical morphemes; the content words are drawn from the seed.
HANGUL_FUNCTION = {
    "subject": ("이", "가"), "object": ("을", "를"),   # (after a final consonant, after a vowel)
    "at": "에서", "that": "그", "plural": "들", "and": "고", "honorific": "시", "end": "다",
    "past": "었", "present": "는", "future": "겠",
}
COUNTERS = {"person": "명", "animal": "마리", "thing": "개", "food": "개", "place": "곳"}


def hangul_lexicon(rng: random.Random) -> Lexicon:
    def syllable() -> str:
        final = 0 if rng.random() < 0.5 else rng.randint(1, 27)
        return hangul(rng.randrange(19), rng.randrange(21), final)

    reserved = set("".join(map(str, HANGUL_FUNCTION.values())) + "".join(COUNTERS.values()) + "한")
    inventory: list[str] = []
    while len(inventory) < 40:
        s = syllable()
        if s not in reserved and s not in inventory:
            inventory.append(s)
    taken: set[str] = set()
    digit_syllables = []
    while len(digit_syllables) < 10:  # 1..9 and ten: one syllable each, as in Sino-Korean numerals
        s = syllable()
        if s not in reserved and s not in inventory and s not in digit_syllables:
            digit_syllables.append(s)
    return Lexicon(
        nouns=tuple(_words(rng, inventory, sum(CLASS_SIZES.values()), (1, 2, 2, 3), taken)),
        verbs=tuple(_words(rng, inventory, N_VERBS, (1, 1, 2), taken)),
        adjectives=tuple(w + "한" for w in _words(rng, inventory, N_ADJECTIVES, (1, 2), taken)),
        digits=("",) + tuple(digit_syllables[:9]),
        ten=digit_syllables[9],
        time_words=dict(zip(TENSES, _words(rng, inventory, 3, (2, 3), taken))),
        function={},
    )


# ---------------------------------------------------------------- rendering


def latin_number(lex: Lexicon, n: int) -> str:
    tens, units = divmod(n, 10)
    words = []
    if tens:
        words.append(lex.ten if tens == 1 else lex.digits[tens] + lex.ten)
    if units:
        words.append(lex.digits[units])
    return " ".join(words)


def render_latin(concepts: Concepts, lex: Lexicon, sentences: list[Sentence]) -> str:
    f = lex.function

    def noun_phrase(np: NounPhrase) -> str:
        plural = np.count > 1
        suffix = (f["plural_animate"] if concepts.noun_class[np.noun] in ANIMATE else f["plural_other"]) if plural else ""
        words = []
        if np.definite:
            words.append(f["definite"])
        if plural:
            words.append(latin_number(lex, np.count))
        elif not np.definite:
            words.append(f["indefinite"])
        if np.adjective is not None:
            words.append(lex.adjectives[np.adjective] + suffix)  # adjectives copy the noun's plural suffix
        words.append(lex.nouns[np.noun] + suffix)
        return " ".join(words)

    def verb(cl: Clause, tense: str) -> str:
        word = lex.verbs[cl.verb] + (f[tense] if tense != "present" else "")
        return word + (f["plural_verb"] if cl.subject.count > 1 else "")

    out = []
    for s in sentences:
        parts = []
        for cl in s.clauses:
            words = [noun_phrase(cl.subject), verb(cl, s.tense), noun_phrase(cl.obj)]
            if cl.place is not None:
                words += [f["at"], noun_phrase(cl.place)]
            parts.append(" ".join(words))
        text = f" {f['and']} ".join(parts)
        if s.time_word:
            text = lex.time_words[s.tense] + " " + text
        out.append(text[0].upper() + text[1:] + ".")
    return " ".join(out)


def hangul_number(lex: Lexicon, n: int) -> str:
    tens, units = divmod(n, 10)
    word = ""
    if tens:
        word += (lex.digits[tens] if tens > 1 else "") + lex.ten
    if units:
        word += lex.digits[units]
    return word


def _particle(word: str, kind: str) -> str:
    after_consonant, after_vowel = HANGUL_FUNCTION[kind]
    return word + (after_consonant if has_final_consonant(word[-1]) else after_vowel)


def render_hangul(concepts: Concepts, lex: Lexicon, sentences: list[Sentence]) -> str:
    h = HANGUL_FUNCTION

    def noun_phrase(np: NounPhrase, particle: Optional[str]) -> str:
        cls = concepts.noun_class[np.noun]
        words = []
        if np.definite:
            words.append(h["that"])
        if np.adjective is not None:
            words.append(lex.adjectives[np.adjective])
        noun = lex.nouns[np.noun] + (h["plural"] if np.count > 1 and cls in ANIMATE else "")
        words.append(noun)
        if np.count > 1:  # noun, then number + counter, and the particle goes last
            words.append(hangul_number(lex, np.count) + COUNTERS[cls])
        last = words[-1]
        if particle == "at":
            last += h["at"]
        elif particle is not None:
            last = _particle(last, particle)
        return " ".join(words[:-1] + [last])

    def verb(cl: Clause, tense: Optional[str]) -> str:
        word = lex.verbs[cl.verb]
        if concepts.noun_class[cl.subject.noun] == "person":
            word += h["honorific"]
        return word + (h["and"] if tense is None else h[tense] + h["end"])

    out = []
    for s in sentences:
        parts = []
        for i, cl in enumerate(s.clauses):
            words = [noun_phrase(cl.subject, "subject")]
            if cl.place is not None:
                words.append(noun_phrase(cl.place, "at"))
            words.append(noun_phrase(cl.obj, "object"))
            last = i == len(s.clauses) - 1  # only the final verb carries tense; earlier ones chain with -고
            words.append(verb(cl, s.tense if last else None))
            parts.append(" ".join(words))
        text = " ".join(parts)
        if s.time_word:
            text = lex.time_words[s.tense] + " " + text
        out.append(text + ".")
    return " ".join(out)


@dataclasses.dataclass(frozen=True)
class SyntheticLanguages:
    """The pair of languages of one seed: shared concepts, one lexicon per script."""

    concepts: Concepts
    latin: Lexicon
    hangul: Lexicon

    def document(self, script: str, rng: random.Random) -> str:
        meaning = story(self.concepts, rng)
        if script == "latin":
            return render_latin(self.concepts, self.latin, meaning)
        return render_hangul(self.concepts, self.hangul, meaning)


def synthetic_languages(seed: int) -> SyntheticLanguages:
    rng = random.Random(f"undo-languages-{seed}")
    concepts = make_concepts(rng)
    return SyntheticLanguages(concepts, latin_lexicon(rng), hangul_lexicon(rng))
