"""FairSISA (Kadhe et al., "FairSISA: Ensemble Post-Processing to Improve Fairness of Unlearning
in LLMs", 2023): SISA's exact deletion, then equalized-odds post-processing of the ensemble.

The deletion is SISA's, unchanged (this class is `SISA` plus one step): the same S x R shard
and slice models (the same auxiliary stages: a `sisa` recipe with the same options shares
them), the affected shards retrained from the checkpoint before the first slice that held a
deleted example, the ensemble of the S shard models; the task's classifier reads it as the
majority vote of the members' decisions. The step added: the ensemble's member margins on the
task's held-out `fit` split, and Hardt et al.'s equalized-odds linear program on them
(`undo.fairness`, scipy linprog), in one of three variants (`postprocess`):
- "vote":    post-process the majority vote;
- "members": post-process each shard model, then vote;
- "vector":  post-process the whole vector of shard decisions (2^S values per group).
The post-processor travels with the model (its config's `fair_postprocess`), so every later
evaluation of it, attacks included, predicts with it. Needs a task with labels, a sensitive
attribute and a held-out split (fair_classification).

Report (the unlearn stage's method_report): SISA's retraining cost, and under "fairsisa" the
variant, its table and the fit split's rates before and after; `deletion_cost` in the metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import fairness
from ..ensemble import EnsembleForCausalLM
from ..errors import UndoError
from .sisa import SISA, SISAOptions


@dataclasses.dataclass
class FairSISAOptions(SISAOptions):
    postprocess: fairness.Variant = "vote"   # what the LP post-processes: vote, members or vector

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.postprocess == "vector" and self.shards > fairness.MAX_VECTOR_MEMBERS:
            raise UndoError(f"{where}.postprocess 'vector' has 2^shards values per group; use at most "
                            f"{fairness.MAX_VECTOR_MEMBERS} shards or postprocess 'vote'")


class FairSISA(SISA):
    name = "fairsisa"
    description = ("FairSISA: SISA's deletion (retrain only the affected shards from their slice checkpoints), "
                   "then equalized-odds post-processing of the shard ensemble (Hardt et al.'s LP)")
    Options = FairSISAOptions

    def export(self, model) -> EnsembleForCausalLM:
        """SISA's deletion, then the post-processor fitted on the task's held-out split."""
        if self.bound is not None and not hasattr(self.bound[0], "scored"):
            raise UndoError(f"method 'fairsisa' needs labels, a sensitive attribute and a held-out split, which task "
                            f"'{self.bound[0].name}' does not have; use task fair_classification (or method sisa)")
        ensemble = super().export(model)  # SISA's deletion; it stops on an unbound task
        task, tok = self.bound
        margins, labels, groups = task.scored(ensemble, tok, task.split("fit"))
        names = task.group_names
        post = fairness.fit_postprocessor(self.options.postprocess, margins, labels, groups, len(names))
        ensemble.config.fair_postprocess = post
        self._report["fairsisa"] = {
            **post, "fit_examples": len(labels),
            "fit_before": fairness.group_rates(fairness.predict_proba(margins, groups), labels, groups, names),
            "fit_after": fairness.group_rates(fairness.predict_proba(margins, groups, post), labels, groups, names)}
        return ensemble

    def report(self) -> dict[str, Any]:
        return self._report
