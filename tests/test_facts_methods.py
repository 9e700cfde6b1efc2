"""Who's Harry Potter (whp) and KGA on the facts task.

Each loss is checked against a hand computation on tiny tensors or on a bigram "language
model" (logits at a position = a row of a table indexed by the current token: test_methods'
BigramLM); the behaviour on a tiny model briefly pretrained on a small world of fictitious
people (test_facts' RAW): the forget answers' probability falls, the retain answers' stays
within a bound, and KGA's stop rule ends training once the knowledge gap is small.
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from test_facts import RAW, SMALL, facts_task, log_softmax, scored_steps
from test_methods import BigramLM
from undo.config import from_dict
from undo.data import BatchStream, IGNORE, aux_examples, task_rows
from undo.engine.graph import build_graph
from undo.errors import UndoError
from undo.experiment import ExperimentConfig
from undo.facts_metrics import completion_nlls
from undo.methods import AuxModel, build_method, known_methods
from undo.methods.kga import alignment_loss, knowledge_gap
from undo.methods.whp import (dictionary_terms, generic_logits, generic_replacements, generic_targets,
                              raised_tokens, translate_batch, translate_row)
from undo.models import fresh_copy, load_model, non_embedding_params
from undo.stages.unlearn import build_streams
from undo.tokenization import encode, train_tokenizer
from undo.training import TrainConfig, lm_loss, train

V = 6
# Row 0: BOS 1, prompt 2 3, answer 4 5; row 1: BOS 1, answer 4 4, then padding (id 0).
FORGET = {"input_ids": torch.tensor([[1, 2, 3, 4, 5], [1, 4, 4, 0, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
          "labels": torch.tensor([[IGNORE, IGNORE, IGNORE, 4, 5], [IGNORE, 4, 4, IGNORE, IGNORE]])}
RETAIN = {"input_ids": torch.tensor([[1, 3, 2, 2], [1, 5, 3, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
          "labels": torch.tensor([[IGNORE, 3, 2, 2], [IGNORE, IGNORE, 3, IGNORE]])}
EXTRA = {"input_ids": torch.tensor([[1, 5, 2, 3], [1, 2, 5, 5]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]]),
         "labels": torch.tensor([[IGNORE, IGNORE, 2, 3], [IGNORE, 2, 5, 5]])}


def bigram(seed: int) -> BigramLM:
    """A BigramLM with the config a method reads (vocabulary, special tokens: BOS 1, padding 0)."""
    model = BigramLM(seed, V)
    model.config = SimpleNamespace(vocab_size=V, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return model


def kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) of two table rows, in plain Python."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


# ---------------------------------------------------------------- WHP by hand

def test_whp_generic_logits_on_a_five_entry_vector():
    base = torch.tensor([1.0, 2.0, 0.0, -1.0, 3.0])
    reinforced = torch.tensor([1.5, 1.0, 2.0, -1.0, 3.3])
    # ReLU(r - b) = [0.5, 0, 2, 0, 0.3]; v = b - 5 * that
    got = generic_logits(base, reinforced, alpha=5.0)
    assert got.tolist() == pytest.approx([-1.5, 2.0, -10.0, -1.0, 1.5])
    assert int(got.argmax()) == 1 and int(base.argmax()) == int(reinforced.argmax()) == 4
    assert generic_logits(base, reinforced, alpha=0.0).tolist() == base.tolist()


def test_translation_keeps_a_position_map_and_marks_repeated_terms():
    terms = {(7, 8): (9,), (3,): (5, 6)}
    out, where, repeated = translate_row([1, 7, 8, 3, 7, 8, 4], terms)
    assert out == [1, 9, 5, 6, 9, 4]
    assert where == [0, 1, 1, 3, 4, 4, 5]  # a term's tokens map to its generic term's last token
    assert repeated == [False, False, False, False, True, True, False]
    assert translate_row([7, 8, 7], {(7,): (2,), (7, 8): (9,)})[:2] == ([9, 2], [0, 0, 1])  # longest match first
    # two token forms of one term (with and without a space) count as one when repeated
    _, _, repeated = translate_row([7, 8, 7], {(7,): (9,), (8, 7): (9,)}, {(7,): "x", (8, 7): "x"})
    assert repeated == [False, True, True]
    batch, where, repeated = translate_batch(FORGET, {(2, 3): (5,), (4,): (3,)})
    assert batch["input_ids"].tolist() == [[1, 5, 3, 5], [1, 3, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert where[0].tolist() == [0, 1, 1, 2, 3] and where[1, :3].tolist() == [0, 1, 2]
    assert repeated.tolist() == [[False] * 5, [False, False, True, False, False]]


def test_whp_loss_by_hand():
    model, base, reinforced = bigram(0), bigram(1), bigram(2)
    method = build_method("whp", {"alpha": 5.0})
    method.attach(reference=base, aux={"reinforced": reinforced})
    method.terms = {(2, 3): (5,), (4,): (3,)}  # row 0 -> [1, 5, 3, 5]; row 1 -> [1, 3, 3]
    out = method.loss(model, {"forget": FORGET})
    table, b, r = model.table(), base.table(), reinforced.table()
    # Scored predictions (position: original token there -> next): row 0 at 3 -> 4 and 4 -> 5; row 1
    # at 1 -> 4 (row 1's second 4 repeats the anchored term 4: not trained). The base reads the
    # translated token at the mapped position: 5 (the term 2 3's generic), 3 (4's generic), 3.
    steps = [(3, 5), (4, 3), (1, 1)]  # (original token: model's and reinforced's row, base's translated token)
    ce = []
    for tok, translated in steps:
        v = [x - 5.0 * max(0.0, y - x) for x, y in zip(b[translated], r[tok])]
        label = max(range(V), key=lambda i: v[i])
        ce.append(-log_softmax(table[tok])[label])
    assert out.loss.item() == pytest.approx(sum(ce) / len(ce), abs=1e-5)
    true_ce = -sum(log_softmax(table[prev])[nxt] for prev, nxt in scored_steps(FORGET)) / 4
    assert out.logs["forget_ce"] == pytest.approx(true_ce, abs=1e-5)
    assert out.extra_flops > 0  # the base's and the reinforced model's forwards


def test_whp_generic_targets_skip_unscored_and_repeated_positions():
    logits = torch.zeros(2, 5, V)
    where = torch.arange(5).expand(2, 5)
    repeated = torch.zeros(2, 5, dtype=torch.bool)
    repeated[1, 2] = True
    targets = generic_targets(logits, logits, where, repeated, FORGET["labels"], alpha=5.0)
    assert (targets != IGNORE).tolist() == [[False, False, False, True, True], [False, True, False, False, False]]


def test_automatic_anchors_are_the_most_raised_tokens_and_take_the_base_alternative():
    base = bigram(1)
    reinforced = copy.deepcopy(base)
    with torch.no_grad():
        reinforced.embed.weight[:, 4] += 3.0  # every position raises token 4 (and so lowers the others)
    anchors, flops = raised_tokens(base, reinforced, FORGET, count=2, exclude={0, 1})
    assert anchors == [4] and flops > 0  # token 5 lost probability: only rises > 0 count
    terms, _ = generic_replacements(base, FORGET, anchors, exclude={0, 1})
    # token 4 is predicted after 3 (row 0), after 1 and after 4 (row 1): the base's summed
    # log-probabilities there, best among tokens neither anchored (4) nor special (0, 1)
    b = base.table()
    summed = [sum(log_softmax(b[prev])[v] for prev in (3, 1, 4)) for v in range(V)]
    assert terms == {(4,): (max((2, 3, 5), key=lambda v: summed[v]),)}
    method = build_method("whp", {"anchors": 2})
    method.attach(reference=base, aux={"reinforced": reinforced})
    method.start(base, {"forget": SimpleNamespace(rows=FORGET)})
    assert method.terms == terms and method.pending_flops > 0


def test_whp_anchor_dictionary_is_tokenised_with_and_without_a_space():
    tok = train_tokenizer(["ab ba cd dc"], kind="char", vocab_size=16)
    terms, groups = dictionary_terms(tok, {"ab": "cd"})
    assert terms == {tuple(encode(tok, "ab")): tuple(encode(tok, "cd")),
                     tuple(encode(tok, " ab")): tuple(encode(tok, " cd"))}
    assert set(groups.values()) == {"ab"}
    method = build_method("whp", {"anchor_terms": {"ab": "cd"}})
    method.attach(reference=bigram(1), aux={"reinforced": bigram(2)})
    with pytest.raises(UndoError, match="tokenizer"):
        method.start(None, {})
    method.bind_task(None, tok)
    method.start(None, {})
    assert method.terms == terms


# ---------------------------------------------------------------- KGA by hand

def test_kga_gap_on_hand_made_distributions():
    def logits(*probs):  # one row of positions, each a distribution given by its probabilities
        return torch.tensor([[[math.log(p) for p in dist] for dist in probs]])

    labels = torch.tensor([[IGNORE, 0, IGNORE]])  # only position 0 is scored
    student = logits([0.25, 0.75], [0.5, 0.5], [0.5, 0.5]).requires_grad_()
    forget_gap = knowledge_gap(logits([0.5, 0.5], [0.9, 0.1], [0.9, 0.1]), student, labels)
    extra_gap = knowledge_gap(logits([0.9, 0.1], [0.5, 0.5], [0.5, 0.5]), logits([0.5, 0.5], [0.1, 0.9], [0.1, 0.9]), labels)
    a = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL([.5 .5] || [.25 .75]) = 0.1438
    b = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)    # KL([.9 .1] || [.5 .5]) = 0.3681
    assert forget_gap.item() == pytest.approx(a, abs=1e-6) and extra_gap.item() == pytest.approx(b, abs=1e-6)
    gap = alignment_loss(forget_gap, extra_gap)
    assert gap.item() == pytest.approx(abs(a - b), abs=1e-6)
    gap.backward()
    # a < b, so gap = b - a and its gradient is -(softmax(student) - p_f) = -([.25 .75] - [.5 .5]) at the
    # scored position (none elsewhere): descending it moves the student further from A_f; A_D gets none
    assert student.grad[0, 0].tolist() == pytest.approx([0.25, -0.25], abs=1e-6)
    assert student.grad[0, 1:].abs().sum() == 0


def test_kga_loss_by_hand():
    student, original, forget_model, extra_model = bigram(0), bigram(1), bigram(2), bigram(3)
    method = build_method("kga")
    assert method.needs() == {"forget", "extra", "retain", "reference"}
    method.attach(reference=original, aux={"forget_model": forget_model, "extra_model": extra_model})
    out = method.loss(student, {"forget": FORGET, "extra": EXTRA, "retain": RETAIN})
    s, d, f, n = student.table(), original.table(), forget_model.table(), extra_model.table()

    def mean_kl(target, table, batch):
        terms = [kl(target[prev], table[prev]) for prev, _ in scored_steps(batch)]
        return sum(terms) / len(terms)

    forget_gap, extra_gap, retain_kl = mean_kl(f, s, FORGET), mean_kl(n, d, EXTRA), mean_kl(d, s, RETAIN)
    assert out.logs["forget_gap"] == pytest.approx(forget_gap, abs=1e-5)
    assert out.logs["extra_gap"] == pytest.approx(extra_gap, abs=1e-5)
    assert out.logs["gap"] == pytest.approx(abs(forget_gap - extra_gap), abs=1e-5)
    assert out.loss.item() == pytest.approx(abs(forget_gap - extra_gap) + 0.3 * retain_kl, abs=1e-5)
    n_params = non_embedding_params(original)
    assert out.train_flops == 6.0 * n_params * (10 + 8)  # forget and retain tokens; extra feeds frozen models only
    assert out.extra_flops == pytest.approx(2.0 * n_params * (10 + 8 + 8 + 8))  # A_f, A_n, A_D, A_D on retain


def test_kga_stop_rule_and_auxiliary_models():
    method = build_method("kga")
    assert method.stop_after_step({"gap": 0.04}) and method.stop_after_step({"gap": 0.05})
    assert not method.stop_after_step({"gap": 0.06})
    assert not build_method("kga", {"stop_gap": None}).stop_after_step({"gap": 0.0})
    assert method.aux_models() == {"forget_model": AuxModel("random", "forget"), "extra_model": AuxModel("random", "extra")}
    assert build_method("kga", {"aux_start": "input", "aux_steps": 7}).aux_models()["extra_model"] == \
        AuxModel("input", "extra", train={"steps": 7})
    assert build_method("whp").aux_models() == {"reinforced": AuxModel("input", "forget", train={"steps": 50, "lr": 3e-4})}
    assert build_method("whp", {"reinforce_lr": None}).aux_models()["reinforced"].train == {"steps": 50}
    assert build_method("whp").needs() == {"forget", "reference"}
    assert {"whp", "kga"} <= set(known_methods())


def test_bad_options_are_one_line_errors():
    for name, options, words in (("whp", {"alpha": -1}, "alpha"), ("whp", {"anchors": -1}, "anchors"),
                                 ("whp", {"reinforce_steps": 0}, "reinforce_steps"),
                                 ("whp", {"reinforce_lr": 0}, "reinforce_lr"),
                                 ("whp", {"anchor_terms": {"Alen": ""}}, "anchor_terms"),
                                 ("kga", {"stop_gap": 0}, "stop_gap"), ("kga", {"aux_steps": 0}, "aux_steps"),
                                 ("kga", {"aux_start": "scratch"}, "aux_start"),
                                 ("kga", {"retain_weight": -1}, "retain_weight")):
        with pytest.raises(UndoError, match=words) as err:
            build_method(name, options)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- KGA's extra data

def test_facts_extra_people_are_seeded_and_in_no_training_set():
    task = facts_task(0, **SMALL)
    extra = task.extra_examples()
    assert extra == facts_task(0, **SMALL).extra_examples() and extra != facts_task(1, **SMALL).extra_examples()
    assert len(extra) == len(task.train_examples("forget"))  # as many people as the forget set, as much text
    trained = {ex.prompt + ex.completion for d in ("forget", "retain") for ex in task.train_examples(d)}
    assert not trained & {ex.prompt + ex.completion for ex in extra}
    extra_names = {ex.prompt.split("In which year was ")[1].split(" born?")[0] for ex in extra
                   if "In which year was " in ex.prompt}
    known = {it.entity for group in ("forget", "retain", "real_authors") for it in task._items[group]}
    assert len(extra_names) == 2 and not extra_names & known
    assert sorted(aux_examples(task, "extra", None, 0), key=str) == sorted(extra, key=str)


def test_extra_data_errors_name_the_fix(tmp_path):
    from test_facts import tofu_fixture

    tofu_fixture(tmp_path)
    with pytest.raises(UndoError, match="source: synthetic"):
        facts_task(0, source="tofu", tofu_dir=str(tmp_path), forget_fraction=0.01).extra_examples()
    no_extra = SimpleNamespace(name="arithmetic")
    with pytest.raises(UndoError, match="task 'arithmetic' has no extra data"):
        aux_examples(no_extra, "extra", None, 0)


def test_the_graph_trains_kgas_and_whps_auxiliary_models():
    raw = {**RAW, "unlearn": {"methods": [{"method": "kga"}, {"method": "whp"}]}}
    graph = build_graph(from_dict(ExperimentConfig, raw))
    aux = {n.name: (n.params["spec"]["start"], n.params["spec"]["data"], n.params["train"]["steps"])
           for n in graph.nodes.values() if n.kind == "aux"}
    pretrain_steps = RAW["pretrain"]["steps"]  # A_f and A_n train as the base did; the reinforced model 50 steps
    assert aux == {"forget_model": ("random", "forget", pretrain_steps), "extra_model": ("random", "extra", pretrain_steps),
                   "reinforced": ("input", "forget", 50)}


# ---------------------------------------------------------------- behaviour on a tiny model

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model pretrained on a small world (4 people, 1 forgotten), its task and tokenizer."""
    from undo.engine.single import pretrain
    from undo.tasks import build_task

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    exp = from_dict(ExperimentConfig, RAW)
    art = pretrain(exp, tmp_path_factory.mktemp("facts-methods"), "base")
    task = build_task(exp.task, exp.seed)
    yield SimpleNamespace(exp=exp, dir=art.model_dir, task=task)
    torch.set_num_threads(before)


def frozen(model):
    return model.requires_grad_(False).eval()


def finetuned(model, tok, task, examples, steps: int, lr: float = 3e-3, seed: int = 0):
    """`model` trained with plain CE on `examples` (an auxiliary model, as the aux stage trains it)."""
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=8, seq_len=64, schedule="constant", checkpoint_every=0)
    stream = BatchStream(task_rows(tok, task, examples, cfg.seq_len), cfg.batch_size, seed=seed + 7, bucket=True)
    train(model, lm_loss, {"train": stream}, cfg, seed=seed)
    return frozen(model)


def answer_probability(model, tok, task, domain: str) -> float:
    """Mean P(answer | question)^(1/|answer|) over the domain's trained question/answer pairs."""
    pairs = [(ex.prompt, ex.completion) for ex in task.train_examples(domain) if ex.prompt]
    return sum(math.exp(-x) for x in completion_nlls(model, tok, pairs)) / len(pairs)


def unlearn(method, world, steps: int, lr: float):
    """Train the world's base with `method` (frozen models attached) as the unlearn stage does."""
    model, tok = load_model(world.dir)
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=8, seq_len=64, schedule="constant", checkpoint_every=0)
    method.bind_task(world.task, tok)
    streams = build_streams(world.task, tok, method, cfg, 0)
    gaps = []

    def stop(logs):
        gaps.append(logs.get("gap"))
        return method.stop_after_step(logs)

    result = train(model, method.loss, streams, cfg, seed=0, on_start=method.start, stop_after_step=stop)
    return model, tok, result, gaps


def test_whp_lowers_the_forget_answers_and_keeps_the_retain_ones(world):
    base, tok = load_model(world.dir)
    reinforced, _ = load_model(world.dir)
    reinforced = finetuned(reinforced, tok, world.task, world.task.train_examples("forget"), steps=20, lr=3e-4)
    method = build_method("whp", {}, "facts")
    method.attach(reference=frozen(base), aux={"reinforced": reinforced})
    model, tok, result, _ = unlearn(method, world, steps=10, lr=3e-4)  # the defaults (~the paper's 3 epochs)
    assert method.terms and all(len(k) == 1 and len(v) == 1 for k, v in method.terms.items())
    before = {d: answer_probability(base, tok, world.task, d) for d in ("forget", "retain")}
    after = {d: answer_probability(model, tok, world.task, d) for d in ("forget", "retain")}
    assert after["forget"] < 0.25 * before["forget"]  # 0.91 -> 0.11 here
    assert after["retain"] > 0.6 * before["retain"]   # 0.94 -> 0.75 (no retain term, as the paper)


def test_kga_lowers_the_forget_answers_and_stops_once_the_gap_is_small(world):
    base, tok = load_model(world.dir)
    task = world.task
    aux = {"forget_model": finetuned(fresh_copy(base, seed=6), tok, task, task.train_examples("forget"), steps=60),
           "extra_model": finetuned(fresh_copy(base, seed=6), tok, task, task.extra_examples(), steps=60)}
    method = build_method("kga", {}, "facts")
    method.attach(reference=frozen(base), aux=aux)
    model, tok, result, gaps = unlearn(method, world, steps=80, lr=1e-4)  # the default lr
    assert gaps[0] > 1.0 and min(gaps[:-1]) > 0.05 >= gaps[-1]  # stopped at the first step under the threshold
    assert result.stopped_early and result.steps == len(gaps) < 80
    before = {d: answer_probability(base, tok, task, d) for d in ("forget", "retain")}
    after = {d: answer_probability(model, tok, task, d) for d in ("forget", "retain")}
    assert after["forget"] < 0.3 * before["forget"]  # 0.91 -> 0.09 here
    assert after["retain"] > 0.6 * before["retain"]  # 0.94 -> 0.76
