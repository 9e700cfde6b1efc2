"""A task and methods defined outside the package, to prove the engine runs them unchanged.

- ToyTask: say a word twice; forget = animal words, retain = colour words; metrics are
  completion cross-entropies.
- ToyAscent: gradient ascent on forget answers + CE on retain (the simplest method).
- Stubs for what later methods need: auxiliary models the engine trains (ShardEnsemble),
  an edit without training (ZeroRows), added adapters through peft (LoraAscent), and a loss
  that samples from the model in the loop (SampledAscent).
"""

from __future__ import annotations

import dataclasses
import random

import torch

from undo.methods.base import AuxModel, Method, ce_of, frozen_logits, logits_of
from undo.losses import forward_kl, scored_positions
from undo.metrics import completion_ce
from undo.tasks.base import Example, Task
from undo.training import LossOutput

RETAIN_WORDS = ["red", "blue", "green", "black", "white", "pink"]
FORGET_WORDS = ["cat", "dog", "owl", "cow", "pig", "hen"]


@dataclasses.dataclass
class ToyTaskOptions:
    examples: int = 96
    loss_on: str = "completion"
    row_format: str = "padded"


class ToyTask(Task):
    name = "toy"
    Options = ToyTaskOptions
    forget_metric, retain_metric, higher_is_better, metric_label = "forget_ce", "retain_ce", False, "cross-entropy"

    def _examples(self, words: list[str], salt: int) -> list[Example]:
        rng = random.Random(self.seed * 10 + salt)
        out = []
        for _ in range(self.options.examples):
            a, b = rng.choice(words), rng.choice(words)
            out.append(Example(f"say {a} {b} :", f" {a} {b} {a}"))
        return out

    def train_examples(self, domain):
        return self._examples(FORGET_WORDS if domain == "forget" else RETAIN_WORDS, int(domain == "forget"))

    def tokenizer_corpus(self):
        return [e.prompt + e.completion for d in ("forget", "retain") for e in self.train_examples(d)]

    def evaluate(self, model, tokenizer, quick=False):
        n = 8 if quick else 24
        return {"forget_ce": completion_ce(model, tokenizer, self.train_examples("forget")[:n]),
                "retain_ce": completion_ce(model, tokenizer, self.train_examples("retain")[:n])}


@dataclasses.dataclass
class AscentOptions:
    retain_weight: float = 1.0
    retain_loss: str = "nll"


class ToyAscent(Method):
    name = "toy_ascent"
    description = "gradient ascent on forget answers plus CE on retain (a test method)"
    Options = AscentOptions
    row_format = "padded"

    def loss(self, model, batches):
        ce = ce_of(model, batches["forget"])
        return self.with_retain(model, batches, LossOutput(-ce, {"forget_ce": ce.item()}))


class ShardEnsemble(Method):
    """Moves toward the mean next-token distribution of two retain-shard models, and keeps a
    reinforced (forget-finetuned) model too: three auxiliary models, trained by the engine."""

    name = "shard_ensemble"
    description = "KL to the mean of shard models on forget data (test stub for auxiliary models)"
    Options = AscentOptions
    row_format = "padded"

    def aux_models(self):
        return {"reinforced": AuxModel("input", "forget", train={"steps": 4, "lr": 3e-3}),
                "shard0": AuxModel("random", "retain", (0, 2), train={"steps": 3}),
                "shard1": AuxModel("random", "retain", (1, 2), train={"steps": 3})}

    def loss(self, model, batches):
        batch = batches["forget"]
        mean_probs, flops = 0.0, 0.0
        for name in ("shard0", "shard1"):
            logits, f = frozen_logits(self.aux[name], batch)
            mean_probs, flops = mean_probs + logits.softmax(-1) / 2, flops + f
        kl = forward_kl(mean_probs.log(), logits_of(model, batch), scored_positions(batch["labels"]))
        return LossOutput(kl, {"kl": kl.item()}, extra_flops=flops)


@dataclasses.dataclass
class ZeroOptions:
    rows: int = 3


class ZeroRows(Method):
    """Zeroes the first `rows` rows of every MLP down-projection input (neurons) in `finish`;
    trains 0 steps."""

    name = "zero_rows"
    description = "zero some MLP neurons without training (test stub for weight edits)"
    Options = ZeroOptions
    train_defaults = {**Method.train_defaults, "steps": 0}

    def loss(self, model, batches):
        raise AssertionError("an edit-only method never computes a loss")

    def finish(self, model, streams):
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, : self.options.rows] = 0.0


@dataclasses.dataclass
class LoraOptions:
    rank: int = 2


class LoraAscent(Method):
    """Ascent through LoRA adapters on the attention projections (peft), merged on export."""

    name = "lora_ascent"
    description = "gradient ascent in LoRA adapters, merged into the weights (test stub for added modules)"
    Options = LoraOptions
    row_format = "padded"

    def adapt(self, model):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=self.options.rank, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                            lora_dropout=0.0, init_lora_weights="gaussian")
        return get_peft_model(model, config)

    def trainable_parameters(self, model):
        return [p for n, p in model.named_parameters() if "lora_" in n]

    def export(self, model):
        return model.merge_and_unload()

    def loss(self, model, batches):
        ce = ce_of(model, batches["forget"])
        return LossOutput(-ce, {"forget_ce": ce.item()})


class SampledAscent(Method):
    """Samples a continuation of each forget prompt from the model in the loop (the torch RNG,
    seeded and checkpointed by the loop) and lowers its likelihood."""

    name = "sampled_ascent"
    description = "ascent on the model's own samples (test stub for sampling in the loop)"
    Options = ZeroOptions
    row_format = "padded"

    def loss(self, model, batches):
        batch = batches["forget"]
        with torch.no_grad():
            logits = logits_of(model, batch)
            sampled = torch.multinomial(logits[:, -1].softmax(-1), self.options.rows, replacement=True)
        ids = torch.cat([batch["input_ids"], sampled], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(sampled)], dim=1)
        labels = torch.cat([torch.full_like(batch["labels"], -100), sampled], dim=1)
        ce = ce_of(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        return LossOutput(-ce, {"sample_ce": ce.item()})
