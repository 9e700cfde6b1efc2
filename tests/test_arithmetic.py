import re

import pytest

from undo.config import from_dict
from undo.errors import UndoError
from undo.tasks import TaskConfig, build_task
from undo.tasks import arithmetic_templates as templates
from undo.tasks.arithmetic import ArithmeticOptions, ArithmeticTask, answer, operand_pairs

EQ = re.compile(r"^(\d+) ([-+*/]) (\d+) =$")


def test_operand_ranges_and_answers():
    task = ArithmeticTask(ArithmeticOptions(), seed=0)
    for domain, limit in (("retain", 50), ("forget", 20)):
        for ex in task.train_examples(domain):
            m = EQ.match(ex.prompt)
            if not m:
                continue
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            value = int(ex.completion)
            if op in "+-":
                assert domain == "retain" and 1 <= a <= limit and 1 <= b <= limit
                assert value == (a + b if op == "+" else a - b) and value >= 0
            else:
                assert domain == "forget"
                if op == "*":
                    assert min(a, b) >= 1 and max(a, b) <= limit and value == a * b
                else:
                    assert a % b == 0 and 1 <= b <= limit and 1 <= value <= limit and value == a // b


def test_eval_prompts_never_in_training():
    task = ArithmeticTask(ArithmeticOptions(), seed=3)
    train_prompts = {ex.prompt for d in ("forget", "retain") for ex in task.train_examples(d)}
    for (op, fmt), examples in task.eval_examples().items():
        assert len(examples) == 100
        for ex in examples:
            assert ex.prompt not in train_prompts, (op, fmt, ex.prompt)


def test_word_problem_templates_held_out():
    for op in templates.TRAIN:
        assert len(templates.TRAIN[op]) == 20 and len(templates.EVAL[op]) == 5
        assert not set(templates.TRAIN[op]) & set(templates.EVAL[op])
    task = ArithmeticTask(ArithmeticOptions(), seed=0)
    eval_word = [ex.prompt for (op, fmt), exs in task.eval_examples().items() if fmt == "word" for ex in exs]
    train_word = [ex.prompt for ex in task.train_examples("retain") + task.train_examples("forget")
                  if not EQ.match(ex.prompt)]
    stems = lambda ts: {t.split("{a}")[0] for op in ts for t in ts[op]}  # noqa: E731
    assert all(any(p.startswith(s) for s in stems(templates.EVAL)) for p in eval_word)
    assert not any(p in set(eval_word) for p in train_word)


def test_deterministic_and_seed_dependent():
    a = ArithmeticTask(ArithmeticOptions(), seed=1).train_examples("forget")
    b = ArithmeticTask(ArithmeticOptions(), seed=1).train_examples("forget")
    c = ArithmeticTask(ArithmeticOptions(), seed=2).train_examples("forget")
    assert a == b and a != c


def test_configurable_split():
    opts = from_dict(ArithmeticOptions, {"forget": ["addition"], "retain": ["subtraction", "division"]})
    task = ArithmeticTask(opts, seed=0)
    forget_eqs = [EQ.match(ex.prompt) for ex in task.train_examples("forget") if EQ.match(ex.prompt)]
    assert forget_eqs and all(m.group(2) == "+" for m in forget_eqs)
    ops = {op for (op, _fmt) in task.eval_examples()}
    assert ops == {"addition", "subtraction", "division"}
    # an operation keeps its own operand range on either side (every split is equally hard)
    assert max(int(EQ.match(e.prompt).group(1)) for e in task.train_examples("forget") if EQ.match(e.prompt)) == 50


def test_bad_options():
    with pytest.raises(UndoError, match="unknown key 'forgt'"):
        build_task(TaskConfig("arithmetic", {"forgt": ["addition"]}), 0)
    with pytest.raises(UndoError, match="not allowed"):
        from_dict(ArithmeticOptions, {"forget": ["exponent"]})
    with pytest.raises(UndoError, match="both forget and retain"):
        from_dict(ArithmeticOptions, {"forget": ["addition"], "retain": ["addition"]})
    with pytest.raises(UndoError, match="unknown task"):
        build_task(TaskConfig("arithmetics"), 0)


@pytest.mark.parametrize("key", ["eval_per_format", "quick_eval_per_format", "examples_per_operation"])
def test_sizes_of_zero_are_rejected_at_config_load(key):
    with pytest.raises(UndoError, match=rf"task.options.{key} must be at least 1, got 0"):
        from_dict(ArithmeticOptions, {key: 0}, "task.options")


def test_empty_forget_or_retain_is_rejected_at_config_load():
    for side in ("forget", "retain"):
        with pytest.raises(UndoError, match="forget and retain each need at least one operation"):
            from_dict(ArithmeticOptions, {side: []}, "task.options")


def test_the_smallest_operand_range_still_has_evaluation_problems():
    smallest = {op: 2 for op in ("addition", "subtraction", "multiplication", "division")}
    task = ArithmeticTask(ArithmeticOptions(max_operand=smallest, examples_per_operation=8), 0)
    assert all(task.eval_examples()[(op, "equation")] for op in ("addition", "subtraction", "multiplication", "division"))


def test_pairs_and_answers():
    assert len(operand_pairs("multiplication", 20)) == 400
    assert len(operand_pairs("subtraction", 50)) == 50 * 51 // 2
    assert all(a % b == 0 for a, b in operand_pairs("division", 20))
    assert answer("division", 12, 4) == 3


# ---------------------------------------------------------------- what evaluation withholds from training

SYMBOLS = {"+": "addition", "-": "subtraction", "*": "multiplication", "/": "division"}
WORD = {op: [re.compile("^" + re.escape(t).replace(r"\{a\}", r"(?P<a>\d+)").replace(r"\{b\}", r"(?P<b>\d+)")
                        + " Answer:$") for t in templates.TRAIN[op] + templates.EVAL[op]] for op in templates.TRAIN}
PRESET_RANGES = {"addition": 20, "subtraction": 20, "multiplication": 10, "division": 10}  # dense: every pair is drawn


def statement(prompt: str) -> tuple[str, str, int, int]:
    """(format, operation, a, b) of any arithmetic prompt, read from its text alone."""
    m = EQ.match(prompt)
    if m:
        return "equation", SYMBOLS[m.group(2)], int(m.group(1)), int(m.group(3))
    found = [(op, r.match(prompt)) for op, rs in WORD.items() for r in rs if r.match(prompt)]
    assert found, prompt
    op, w = found[0]
    return "word", op, int(w.group("a")), int(w.group("b"))


def fact(op: str, a: int, b: int) -> tuple[str, int, frozenset]:
    """A fact without its arrangement: 3 * 4, 4 * 3, 12 / 3 and 12 / 4 are one fact."""
    c = answer(op, a, b)
    if op == "addition":
        return "+", c, frozenset((a, b))
    if op == "subtraction":
        return "+", a, frozenset((b, c))
    if op == "multiplication":
        return "*", c, frozenset((a, b))
    return "*", a, frozenset((b, c))


def training_statements(task):
    return [statement(ex.prompt) for d in ("forget", "retain") for ex in task.train_examples(d)]


def eval_statements(task):
    return [statement(ex.prompt) for exs in task.eval_examples().values() for ex in exs]


@pytest.mark.parametrize("seed", [0, 1])
def test_withhold_eval_facts_leaves_no_evaluation_fact_in_any_training_text(seed):
    opts = ArithmeticOptions(max_operand=PRESET_RANGES, examples_per_operation=3000, withhold_eval_facts=True)
    task = ArithmeticTask(opts, seed)
    train, held = training_statements(task), eval_statements(task)
    assert {(op, a, b) for _f, op, a, b in held} & {(op, a, b) for _f, op, a, b in train} == set()
    assert {fact(op, a, b) for _f, op, a, b in held} & {fact(op, a, b) for _f, op, a, b in train} == set()
    assert {fmt for fmt, *_ in train} == {"equation", "word"} and {op for _f, op, *_ in held} == set(PRESET_RANGES)


@pytest.mark.parametrize("seed", [0, 1])
def test_by_default_evaluation_facts_are_trained_only_as_word_problems_with_training_templates(seed):
    task = ArithmeticTask(ArithmeticOptions(max_operand=PRESET_RANGES, examples_per_operation=3000), seed)
    train = training_statements(task)
    held = {(op, a, b) for _f, op, a, b in eval_statements(task)}
    assert {(op, a, b) for f, op, a, b in eval_statements(task) if f == "word"} == held  # both formats ask the same
    assert held and not held & {(op, a, b) for f, op, a, b in train if f == "equation"}  # never as an equation
    assert held <= {(op, a, b) for f, op, a, b in train if f == "word"}                  # always as words
    train_prompts = {ex.prompt for d in ("forget", "retain") for ex in task.train_examples(d)}
    assert not any(ex.prompt in train_prompts for exs in task.eval_examples().values() for ex in exs)


def test_with_one_format_the_evaluation_pairs_are_not_trained():
    task = ArithmeticTask(ArithmeticOptions(max_operand=PRESET_RANGES, formats=["equation"]), 0)
    held = {(op, a, b) for _f, op, a, b in eval_statements(task)}
    assert held and not held & {(op, a, b) for _f, op, a, b in training_statements(task)}


def test_operand_ranges_are_per_operation_and_checked():
    opts = from_dict(ArithmeticOptions, {"max_operand": {"multiplication": 5}}, "task.options")
    task = ArithmeticTask(opts, 0)
    assert task.max_operand("multiplication") == 5 and task.max_operand("addition") == 50
    with pytest.raises(UndoError, match="max_operand: unknown operation 'modulo'"):
        from_dict(ArithmeticOptions, {"max_operand": {"modulo": 5}}, "task.options")
    with pytest.raises(UndoError, match="max_operand.division must be an integer >= 2"):
        from_dict(ArithmeticOptions, {"max_operand": {"division": 1}}, "task.options")
