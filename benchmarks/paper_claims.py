"""The UNDO paper's four claims, checked on every graph seed of a run.

    python benchmarks/paper_claims.py arithmetic-seeds     # runs it first (cached stages are reused)
    python benchmarks/paper_claims.py arithmetic-seeds --no-run --run-dir runs/arithmetic-seeds
    python benchmarks/paper_claims.py quick --seeds 3 --run-dir /tmp/quick3   # a smoke run (~4 min)

Every number is a mean over all graph seeds of the run, with [min, max] and, with >= 3 seeds,
the half-width of the 95% Student-t interval: the report's numbers (`undo.report.summarize`).
Robustness is the worst case at the final attack step: the attacker's best forget metric over
learning rates and over every step up to it, per seed, averaged over attack seeds.

A comparison "x below y" is "held" when x's interval lies wholly below y's, "not held" when it
lies wholly above, and "not separable" when they overlap; the interval is the 95% t-interval
with >= 3 seeds, else [min, max] (one seed: the value). "Close to the oracle" widens the
comparison by `--tolerance`: absolute for accuracies, relative to the oracle's value for
cross-entropies. A claim is held when every part is held, not held when any part is not held,
not separable otherwise. A distillation counts as recovered only when its retain metric
recovered in every seed; claims 2-4 are about distillations that recovered (a student that
learned nothing does not hold a claim). The checks are fixed here, not tuned to the results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from undo.experiment import load_experiment
from undo.report import Spread, Summary, format_spread, spread, spread_note, summarize
from undo.store import ResultStore

HELD, NOT_HELD, NOT_SEPARABLE = "held", "not held", "not separable"


def below(x: Spread, y: Spread, margin: float = 0.0) -> str:
    """x < y + margin, judged on the intervals: held, not held, or not separable (they overlap)."""
    (x_low, x_high), (y_low, y_high) = x.interval(), y.interval()
    if x_high < y_low + margin:
        return HELD
    if x_low > y_high + margin:
        return NOT_HELD
    return NOT_SEPARABLE


def combine(verdicts: list[str]) -> str:
    """A claim's verdict from its parts' (no parts: nothing to hold it)."""
    if not verdicts or NOT_HELD in verdicts:
        return NOT_HELD
    return NOT_SEPARABLE if NOT_SEPARABLE in verdicts else HELD


def capability(s: Spread, higher_is_better: bool) -> Spread:
    """The spread on a scale where more = more forget capability = less robust (CE is negated)."""
    if higher_is_better:
        return s
    return Spread(-s.mean, -s.high, -s.low, s.n, s.ci)


class Claims:
    """The four claims over one run's summary; each returns (verdict, [(part, verdict, numbers)])."""

    def __init__(self, summary: Summary, tolerance: float):
        self.s, self.task = summary, summary.task
        self.higher = bool(self.task["higher_is_better"])
        self.kinds = {r.name: r.kind for r in summary.rows}
        oracle = self.of_kind("oracle")
        self.oracle = oracle[0] if oracle else None
        final = self.value(self.oracle, "forget_final") if self.oracle else None
        # the margin of "close to": absolute for accuracies, a fraction of the oracle's CE otherwise
        self.margin = tolerance if self.higher or final is None else tolerance * abs(final.mean)

    def of_kind(self, kind: str) -> list[str]:
        return [n for n in self.s.names() if self.kinds[n] == kind]

    def value(self, name: str, field: str) -> Optional[Spread]:
        return self.s.spread(name, field)

    def cap(self, name: str, field: str) -> Optional[Spread]:
        v = self.value(name, field)
        return None if v is None else capability(v, self.higher)

    def text(self, name: str, field: str) -> str:
        return f"{name} {format_spread(self.value(name, field))}"

    def recovered(self, name: str) -> tuple[str, str]:
        rows = self.s.of(name)
        done = sum(bool(r.recovered) for r in rows)
        steps = ", ".join(str(r.recovered_step) if r.recovered else "no" for r in rows)
        return (HELD if done == len(rows) else NOT_HELD), f"recovered in {done}/{len(rows)} seeds (steps {steps})"

    def missing(self, *names: Optional[str]) -> Optional[tuple[str, list]]:
        if all(n is not None and self.value(n, "forget_final") is not None for n in names):
            return None
        return NOT_HELD, [("the run lacks these models or their attack results", NOT_HELD, "")]

    def claim1(self) -> tuple[str, list]:
        om = next(iter(self.of_kind("oracle_matching")), None)
        if (gap := self.missing(om, self.oracle)) is not None:
            return gap
        o = self.oracle
        before = combine([below(self.cap(om, "forget_before"), self.cap(o, "forget_before"), self.margin),
                          below(self.cap(o, "forget_before"), self.cap(om, "forget_before"), self.margin)])
        faster = below(self.cap(o, "forget_final"), self.cap(om, "forget_final"))
        parts = [(f"before the attack, within {self.margin:.3g} of the oracle", before,
                  f"{self.text(om, 'forget_before')}; {self.text(o, 'forget_before')}"),
                 ("after the attack, more forget capability than the oracle", faster,
                  f"{self.text(om, 'forget_final')}; {self.text(o, 'forget_final')}")]
        return combine([p[1] for p in parts]), parts

    def claim2(self) -> tuple[str, list]:
        students = self.of_kind("unlearn_distill")
        if (gap := self.missing(*(students or [None]), self.oracle)) is not None:
            return gap
        parts = []
        for ud in students:
            verdict, numbers = self.recovered(ud)
            parts.append((f"{ud}: the student's retain metric recovered", verdict,
                          f"{numbers}; {self.text(ud, 'retain_before')}"))
            parts.append((f"{ud}: after the attack, within {self.margin:.3g} of the oracle or below",
                          below(self.cap(ud, "forget_final"), self.cap(self.oracle, "forget_final"), self.margin),
                          f"{self.text(ud, 'forget_final')}; {self.text(self.oracle, 'forget_final')}"))
        return combine([p[1] for p in parts]), parts

    def undo_groups(self) -> dict[Optional[str], list[str]]:
        """UNDO models by teacher, each group by alpha."""
        groups: dict[Optional[str], list[str]] = {}
        for name in self.of_kind("undo"):
            groups.setdefault(self.s.of(name)[0].teacher, []).append(name)
        return {t: sorted(names, key=lambda n: self.s.of(n)[0].alpha or 0.0) for t, names in groups.items()}

    def claim3(self) -> tuple[str, list]:
        parts = []
        for teacher, names in self.undo_groups().items():
            if len(names) < 2:
                continue
            low, high = names[0], names[-1]
            for name in (low, high):
                verdict, numbers = self.recovered(name)
                parts.append((f"{name}: retain recovered", verdict, numbers))
            parts.append((f"{high} more robust than {low}",
                          below(self.cap(high, "forget_final"), self.cap(low, "forget_final")),
                          ", ".join(self.text(n, "forget_final") for n in names)))
            parts.append((f"{high} needs more distillation compute to recover than {low}",
                          self.compute_below(low, high),
                          ", ".join(self.text(n, "distill_compute") for n in names)))
        if not parts:
            return NOT_HELD, [("fewer than two UNDO alphas after one teacher", NOT_HELD, "")]
        return combine([p[1] for p in parts]), parts

    def compute_below(self, a: str, b: str) -> str:
        x, y = self.value(a, "distill_compute"), self.value(b, "distill_compute")
        return NOT_HELD if x is None or y is None else below(x, y)

    def claim4(self) -> tuple[str, list]:
        undo = [n for n in self.of_kind("undo") if self.recovered(n)[0] == HELD]
        if (gap := self.missing(self.oracle)) is not None:
            return gap
        if not undo:
            return NOT_HELD, [("an UNDO setting whose retain recovered in every seed", NOT_HELD,
                               ", ".join(f"{n} {self.recovered(n)[1]}" for n in self.of_kind("undo")))]
        ranked = [n for n in undo if self.cap(n, "forget_final") is not None]
        if not ranked:
            return NOT_HELD, [("attack results of the recovered UNDO settings", NOT_HELD, "")]
        best = min(ranked, key=lambda n: self.cap(n, "forget_final").mean)
        o = self.oracle
        compute = self.value(best, "distill_compute")
        parts = [(f"{best} (the most robust recovered UNDO setting) within {self.margin:.3g} of the oracle",
                  below(self.cap(best, "forget_final"), self.cap(o, "forget_final"), self.margin),
                  f"{self.text(best, 'forget_final')}; {self.text(o, 'forget_final')}"),
                 (f"{best}'s distillation compute below the oracle's pretraining ({self.s.distill_label})",
                  NOT_HELD if compute is None else below(compute, spread([1.0])), format_spread(compute))]
        for m in self.of_kind("method"):
            if self.cap(m, "forget_final") is not None:
                parts.append((f"{m} (a plain method) further than {self.margin:.3g} from the oracle",
                              below(self.cap(o, "forget_final"), self.cap(m, "forget_final"), -self.margin),
                              f"{self.text(m, 'forget_final')}; {self.text(o, 'forget_final')}"))
        return combine([p[1] for p in parts]), parts


CLAIMS = [("1. Oracle matching behaves like the oracle but relearns much faster than it", "claim1"),
          ("2. Distilling the unlearned teacher into a random student relearns about as slowly as the oracle",
           "claim2"),
          ("3. UNDO: a larger alpha gives more robustness for more distillation compute", "claim3"),
          ("4. UNDO's best recovered setting comes close to the oracle's robustness at a fraction of the "
           "oracle's pretraining compute; the plain methods do not", "claim4")]


def check(summary: Summary, tolerance: float) -> list[tuple[str, str, list]]:
    """[(claim, verdict, parts)] for the paper's four claims."""
    claims = Claims(summary, tolerance)
    return [(text, *getattr(claims, method)()) for text, method in CLAIMS]


def render(summary: Summary, results: list[tuple[str, str, list]]) -> str:
    task = summary.task
    direction = "lower" if task["higher_is_better"] else "higher"
    lines = [f"{task['name']}: {len(summary.seeds)} graph seeds ({', '.join(map(str, summary.seeds))}); "
             f"{spread_note(summary)}",
             f"robustness = worst case of {task['forget_metric']} after {summary.final_step} attack steps (over "
             f"learning rates and steps <= {summary.final_step}); {direction} = more robust", ""]
    for text, verdict, parts in results:
        lines.append(f"[{verdict.upper()}] {text}")
        lines += [f"    - {part}: {v}" + (f"\n        {numbers}" if numbers else "") for part, v, numbers in parts]
    counts = {v: sum(r[1] == v for r in results) for v in (HELD, NOT_SEPARABLE, NOT_HELD)}
    lines.append(f"\n{counts[HELD]}/{len(results)} claims held, {counts[NOT_SEPARABLE]} not separable, "
                 f"{counts[NOT_HELD]} not held")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="arithmetic-seeds")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--no-run", action="store_true", help="only read an existing run")
    ap.add_argument("--tolerance", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, default=None, metavar="N", help="graph seeds 0..N-1 (as `undo run --seeds N`)")
    args = ap.parse_args()
    seeds = [] if args.seeds is None else [f"seeds=[{', '.join(map(str, range(args.seeds)))}]"]
    exp = load_experiment(args.config, seeds)
    run_dir = Path(args.run_dir or f"runs/{exp.name}")
    if not args.no_run:
        from undo.engine.run import run_experiment

        run_experiment(exp, run_dir)
    task = json.loads((run_dir / "task.json").read_text())
    summary = summarize(ResultStore(run_dir / "results.sqlite"), task)
    print(render(summary, check(summary, args.tolerance)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
