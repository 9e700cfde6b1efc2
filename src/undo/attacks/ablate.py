"""Directional ablation: find the direction unlearning wrote into the residual stream, project
it out everywhere, and measure what comes back (Arditi et al. 2024's refusal-direction
ablation; Lucki et al. 2024, "An adversarial perspective on machine unlearning for AI
safety", recover most of RMU's "forgotten" WMDP accuracy this way).

The direction. Let h_k^M(x) be model M's residual stream after k decoder layers
(`arch.residual_streams`, k = 0: the embeddings), averaged over the tokens of text x (BOS
excluded), and mu_k^M(D) its mean over a seeded sample of `examples` training texts
(prompt + completion) of domain D: F = forget, R = retain. U is the attacked model, B the
base it was unlearned from. Candidate directions, one per depth k:

- `forget_retain` (Arditi et al.'s difference of means; needs no base):
      r_k = mu_k^U(F) - mu_k^U(R)
- `unlearned_base` (Lucki et al.'s direction for RMU: what unlearning changed on forget text):
      r_k = mu_k^U(F) - mu_k^B(F)
- `both` (what unlearning changed on forget text beyond what it changed on retain text; a
  shift of every input, e.g. UNDO's noise and distillation, cancels):
      r_k = [mu_k^U(F) - mu_k^U(R)] - [mu_k^B(F) - mu_k^B(R)]
- `auto` (default): `both` when a base checkpoint is known, else `forget_retain`.

The ablation. With r = r_k / |r_k|, every write to the residual stream x becomes
x - (x . r) r, at every layer and position (`arch.direction_ablated`: the embeddings and
each attention and MLP output), so the stream never has a component along r.

The attacker picks the depth k with its own data: the one whose ablation gives the best
forget score on `select_examples` forget training examples (`Task.score_items`). The curve:
step 0, the forget items unablated; step 1, the forget items with the chosen direction
ablated, with `ablate_layer` (k), `ablate_norm` (|r_k|) and each depth's selection score
(`ablate_select/layer<k>`). A zero direction (the base against itself) is not ablated.

The base comes from the `base` option (a checkpoint directory), from the engine (the
`base_dir` argument of `run`, when the stage passes its base input), or from the
experiment's `models.base.path` when the base is a given checkpoint.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import arch
from ..config import expand_path, to_dict
from ..errors import UndoError
from ..models import load_model, non_embedding_params
from ..tasks import Task, build_task
from ..tasks.base import Example
from .base import Attack
from .probe import read_streams

Contrast = Literal["auto", "forget_retain", "unlearned_base", "both"]


@dataclasses.dataclass
class AblateConfig:
    contrast: Contrast = "auto"
    base: Optional[str] = None          # the base checkpoint (default: the engine's or the experiment's base)
    examples: int = 256                 # training texts per domain for the means
    select_examples: int = 100          # forget training examples that choose the depth
    max_tokens: int = 128               # texts are cut to this many tokens
    batch_size: int = 64
    quick_eval: bool = False            # score the task's quick subset of forget items

    def validate(self, where: str) -> None:
        self.base = expand_path(self.base)
        for name in ("examples", "select_examples", "max_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UndoError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")


def domain_means(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: dict[str, list[str]],
                 max_tokens: int, batch_size: int) -> tuple[dict[str, torch.Tensor], int]:
    """mu_k(D) for each domain D: [depths, hidden], and the tokens read."""
    means, tokens = {}, 0
    for domain, domain_texts in texts.items():
        streams, n = read_streams(model, tok, domain_texts, max_tokens, "mean", batch_size)
        means[domain] = streams.mean(dim=1)
        tokens += n
    return means, tokens


def directions(contrast: str, unlearned: dict[str, torch.Tensor],
               base: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """The candidate directions r_k ([depths, hidden]) of the module docstring."""
    if contrast == "forget_retain":
        return unlearned["forget"] - unlearned["retain"]
    if base is None:
        raise UndoError(f"ablate contrast '{contrast}' needs the base model; give options.base (a checkpoint "
                        f"directory) or use contrast: forget_retain")
    if base["forget"].shape != unlearned["forget"].shape:
        raise UndoError(f"ablate: the base's residual stream has shape {tuple(base['forget'].shape)} (depths, hidden), "
                        f"the attacked model's {tuple(unlearned['forget'].shape)}; give the base it was unlearned from")
    if contrast == "unlearned_base":
        return unlearned["forget"] - base["forget"]
    return (unlearned["forget"] - unlearned["retain"]) - (base["forget"] - base["retain"])


def _better(task: Task, a: float, b: float) -> bool:
    return a > b if task.higher_is_better else a < b


class Ablate(Attack):
    name = "ablate"
    description = "project the forget-vs-retain (unlearned-vs-base) direction out of the residual stream everywhere"
    Options = AblateConfig
    reads = ("base",)  # a starting model it reads besides its target (for the engine to pass as base_dir)

    def base_dir(self, exp, base_dir: Optional[Path]) -> Optional[Path]:
        if self.options.base:
            return Path(self.options.base)
        if base_dir is not None:
            return Path(base_dir)
        start = getattr(exp, "models", {}).get("base")
        return Path(start.path) if start is not None and getattr(start, "path", None) else None

    def run(self, exp, model_dir: Path, point: dict[str, Any], seed: int, desc: str,
            base_dir: Optional[Path] = None) -> dict[str, Any]:
        cfg = self.options
        start = time.time()
        task = build_task(exp.task, exp.seed)
        model, tok = load_model(model_dir)
        base_path = self.base_dir(exp, base_dir)
        contrast = cfg.contrast if cfg.contrast != "auto" else ("both" if base_path else "forget_retain")

        rng = random.Random(seed)
        texts = {}
        for domain in ("forget", "retain"):
            examples = list(task.train_examples(domain))
            rng.shuffle(examples)
            texts[domain] = [ex.prompt + ex.completion for ex in examples[: cfg.examples]]
        means, tokens = domain_means(model, tok, texts, cfg.max_tokens, cfg.batch_size)
        base_means, flops = None, 2.0 * non_embedding_params(model) * tokens
        if contrast != "forget_retain":
            if base_path is None:
                raise UndoError(f"ablate contrast '{contrast}' needs the base model; give options.base "
                                f"(a checkpoint directory) or use contrast: forget_retain")
            base, base_tok = load_model(base_path)
            base_means, base_tokens = domain_means(base, base_tok, texts, cfg.max_tokens, cfg.batch_size)
            flops += 2.0 * non_embedding_params(base) * base_tokens
            del base
        candidates = directions(contrast, means, base_means)

        forget = list(task.train_examples("forget"))
        random.Random(seed + 1).shuffle(forget)
        select = {"select": [Example(ex.prompt, ex.completion) for ex in forget[: cfg.select_examples]]}
        items = task.forget_items(cfg.quick_eval)
        metric = task.forget_metric
        before = task.score_items(model, tok, items)
        scores: dict[int, float] = {}
        for depth, r in enumerate(candidates):
            if r.norm() > 1e-4 * means["forget"][depth].norm():  # else zero up to rounding (a model against itself)
                with arch.direction_ablated(model, r):
                    scores[depth] = task.score_items(model, tok, select)[metric]
        entry: dict[str, Any] = {"step": 1, "ablate_norm": 0.0, "ablate_layer": -1}
        if scores:
            best = None
            for depth, score in scores.items():
                if best is None or _better(task, score, scores[best]):
                    best = depth
            with arch.direction_ablated(model, candidates[best]):
                entry.update(task.score_items(model, tok, items))
            entry.update({"ablate_layer": best, "ablate_norm": float(candidates[best].norm())})
            entry.update({f"ablate_select/layer{k}": v for k, v in scores.items()})
        else:
            entry.update(before)  # no direction to remove: the model as it is
        return {"curve": [{"step": 0, **before}, entry], "flops": flops, "wall_seconds": time.time() - start,
                "contrast": contrast, "base": str(base_path) if base_path else None, "config": to_dict(cfg)}
