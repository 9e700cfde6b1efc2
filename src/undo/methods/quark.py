"""Quark (Lu et al., "Quark: Controllable Text Generation with Reinforced Unlearning", NeurIPS
2022): learn to generate what a reward likes by conditioning on quantized reward tokens.

The loop (reference: methods.md "1."), inside the one training loop:
- explore: every `explore_every` steps, sample one continuation for each of `explore_samples`
  training prompts (the task's `prompts("train")`) and score it with the task's `reward`; the
  first time from the reference model p_ref, later from the policy conditioned on the best
  reward token r_1. Samples join a pool that only grows.
- quantize: sort the pool by reward into K = `quantiles` equal parts, best first; each sample
  is tagged with its part's token r_k.
- learn: per response token,
      L = CE(y_t | r_k, x, y_<t) + b * KL(p_theta || p_ref) - e * H(p_theta),  b = 0.05, e = 0.06,
  on batches drawn from the pool; p_ref sees the prompt without the reward token.
The reward tokens are K new rows of the model's vocabulary (ids V..V+K-1; the tokenizer never
spells them: rows are built from ids), initialised from N(mean, std) of the existing embeddings
per dimension, as the paper's code does. A row is [r_k] prompt response: the reward token takes
the place of BOS (the paper's GPT-2 has no BOS and prepends it), so p_ref's row [BOS] prompt
response lines up position by position. The policy's distribution is over the original V tokens
(it never predicts a reward token). At the end the model is exported conditioned on r_1: r_1's
embedding becomes BOS's and the K rows are removed, so the saved model is a plain checkpoint of
the original vocabulary that generates "given r_1" from every [BOS] prompt (evaluation, UNDO and
attacks need nothing special). With tied embeddings BOS's output row changes with it: the
probability of predicting BOS, which no text has after its first position, is what moves.

Design: the explore step lives in the method's data stream (`QuarkPool.batch(step)`), which
the loop asks for every step's batch; it samples with the model being trained (handed over in
`start`). The pool lives in memory, so a Quark run cannot resume from a resume point (the
default `checkpoint_every: 0` writes none).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data import IGNORE
from ..errors import UndoError
from ..losses import masked_mean, scored_positions
from ..metrics import masked_ce
from ..models import non_embedding_params
from ..rewards import checked_scores, sample_continuations
from ..tokenization import encode_many
from ..training import LossOutput, TrainConfig
from .base import Batch, Method, frozen_logits, logits_of


@dataclasses.dataclass
class QuarkOptions:
    quantiles: int = 5                  # K reward tokens
    kl_weight: float = 0.05             # b
    entropy_weight: float = 0.06        # e
    explore_every: int = 20             # N: training steps between explore steps
    explore_samples: int = 128          # continuations sampled per explore step (one per prompt)
    max_new_tokens: Optional[int] = None  # of a sampled continuation (None: the task's)
    top_p: float = 1.0                  # sampling while exploring
    temperature: float = 1.0

    def validate(self, where: str) -> None:
        if self.quantiles < 2:
            raise UndoError(f"{where}.quantiles must be at least 2 (a best and a worse reward token), "
                            f"got {self.quantiles}")
        if self.kl_weight < 0 or self.entropy_weight < 0:
            raise UndoError(f"{where}: kl_weight and entropy_weight must be >= 0")
        for name in ("explore_every", "explore_samples"):
            if getattr(self, name) < 1:
                raise UndoError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UndoError(f"{where}.max_new_tokens must be at least 1 (or null for the task's)")
        if not (0 < self.top_p <= 1 and self.temperature > 0):
            raise UndoError(f"{where}: top_p must be in (0, 1] and temperature > 0")


# ---------------------------------------------------------------- the pieces, as plain functions

def quantile_tokens(rewards: Any, k: int) -> np.ndarray:
    """Each sample's quantile 0..k-1 (0: the best rewards, tagged r_1): the pool sorted by reward,
    highest first (ties in pool order), cut into k parts of equal size (the first ones one larger
    where the pool does not divide)."""
    order = np.argsort(-np.asarray(rewards, dtype=float), kind="stable")
    tokens = np.empty(len(order), dtype=int)
    for q, part in enumerate(np.array_split(order, k)):
        tokens[part] = q
    return tokens


def kl_and_entropy(logits: torch.Tensor, ref_logits: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p_theta || p_ref) and the entropy H(p_theta), each averaged over `mask`'s positions."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    p = logp.exp()
    kl = (p * (logp - ref_logp)).sum(-1)
    entropy = -(p * logp).sum(-1)
    return masked_mean(kl, mask), masked_mean(entropy, mask)


def quark_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, kl_weight: float,
               entropy_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + b * KL(p_theta || p_ref) - e * H(p_theta) over the response tokens (`labels`)."""
    ce = masked_ce(logits, labels)
    kl, entropy = kl_and_entropy(logits, ref_logits, scored_positions(labels))
    loss = ce + kl_weight * kl - entropy_weight * entropy
    return loss, {"ce": ce.item(), "kl": kl.item(), "entropy": entropy.item()}


def init_reward_embeddings(weight: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k new rows drawn per dimension from N(mean, std) of `weight`'s rows."""
    g = torch.Generator().manual_seed(seed)
    w = weight.detach().float().cpu()
    return (w.mean(0) + w.std(0) * torch.randn(k, w.shape[1], generator=g)).to(weight.dtype)


@dataclasses.dataclass
class Sample:
    prompt: list[int]
    response: list[int]                 # ends with EOS where the sampler stopped there
    reward: float


class QuarkPool:
    """The stream Quark trains on. `batch(step)` explores first on every `explore_every`-th step
    (sample, score, add to the pool, re-quantize), then returns `batch_size` pool samples drawn
    with (seed, step): rows [r_k] prompt response, `ref_input_ids` [BOS] prompt response, labels
    on the response. `policy` (the model being trained) is set by `Quark.start`."""

    def __init__(self, method: "Quark", prompts: list[list[int]], batch_size: int, seed: int):
        self.method, self.prompts, self.batch_size, self.seed = method, prompts, batch_size, seed
        self.policy: Optional[torch.nn.Module] = None
        self.samples: list[Sample] = []
        self.tokens = np.zeros(0, dtype=int)
        self.log: list[dict[str, float]] = []   # one entry per explore step
        self.flops = 0.0
        self.next_step = 0

    def batch(self, step: int) -> Batch:
        if step != self.next_step:
            raise UndoError(f"quark keeps its sample pool in memory and cannot resume at step {step}; "
                            f"set train.checkpoint_every: 0 (its default) and run the stage again")
        self.next_step = step + 1
        if step % self.method.options.explore_every == 0:
            self.explore(step)
        rng = random.Random(self.seed * 1_000_003 + step)
        return self.rows([rng.randrange(len(self.samples)) for _ in range(self.batch_size)])

    def explore(self, step: int) -> None:
        m, o = self.method, self.method.options
        rng = random.Random(self.seed * 7_777_777 + step)
        # one prompt each, without repeats until every prompt has had its turn
        slots = rng.sample(range(max(len(self.prompts), o.explore_samples)), o.explore_samples)
        picked = [self.prompts[i % len(self.prompts)] for i in slots]
        first = not self.samples
        model = m.reference if first else self.policy
        start = m.bos_id if first else m.reward_ids[0]
        responses = sample_continuations(model, [[start] + p for p in picked], m.max_new_tokens,
                                         seed=self.seed * 31 + step, pad_id=m.tok.pad_token_id,
                                         eos_id=m.tok.eos_token_id, top_p=o.top_p, temperature=o.temperature,
                                         suppress=m.reward_ids)
        texts = [m.tok.decode(r, skip_special_tokens=True) for r in responses]
        rewards = checked_scores(m.task_obj.reward(texts), len(texts), "reward")
        self.samples += [Sample(p, r, float(x)) for p, r, x in zip(picked, responses, rewards) if r]
        self.tokens = quantile_tokens([s.reward for s in self.samples], o.quantiles)
        self.flops += 2.0 * non_embedding_params(model) * sum(len(p) + 1 + m.max_new_tokens for p in picked)
        self.log.append({"step": step, "from": "reference" if first else "policy|r_1",
                         "mean_reward": float(rewards.mean()), "pool": len(self.samples)})

    def rows(self, indices: list[int]) -> Batch:
        m = self.method
        seqs = [(self.samples[i], m.reward_ids[self.tokens[i]]) for i in indices]
        width = max(1 + len(s.prompt) + len(s.response) for s, _ in seqs)
        n = len(seqs)
        ids = torch.full((n, width), m.tok.pad_token_id, dtype=torch.long)
        ref_ids, mask = ids.clone(), torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for row, (s, token) in enumerate(seqs):
            body = torch.tensor(s.prompt + s.response, dtype=torch.long)
            end = 1 + len(body)
            ids[row, 0], ids[row, 1:end] = token, body
            ref_ids[row, 0], ref_ids[row, 1:end] = m.bos_id, body
            mask[row, :end] = 1
            labels[row, 1 + len(s.prompt):end] = body[len(s.prompt):]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "ref_input_ids": ref_ids}


class Quark(Method):
    name = "quark"
    description = ("reinforced unlearning (Lu et al.): sample, quantize by reward into K reward tokens, learn "
                   "CE | r_k + b x KL(p || p_ref) - e x H(p); generate conditioned on the best token")
    Options = QuarkOptions
    forget_needs = frozenset({"reference", "prompts"})
    # the paper's lr is 1e-5 for GPT-2 large; a tiny model takes larger steps
    train_defaults = dict(Method.train_defaults, steps=100, lr=5e-4, batch_size=32, checkpoint_every=0)

    def __init__(self, options: QuarkOptions, task: Optional[str] = None, seed: int = 0):
        super().__init__(options, task, seed)
        self.task_obj: Any = None
        self.tok: Any = None
        self.vocab = 0
        self.reward_ids: list[int] = []
        self.pool: Optional[QuarkPool] = None

    @property
    def bos_id(self) -> int:
        return self.tok.bos_token_id

    @property
    def max_new_tokens(self) -> int:
        return self.options.max_new_tokens or self.task_obj.options.max_new_tokens

    def adapt(self, model: torch.nn.Module) -> torch.nn.Module:
        """Add the K reward tokens as new embedding rows."""
        emb = model.get_input_embeddings().weight
        self.vocab = emb.shape[0]
        new_rows = init_reward_embeddings(emb, self.options.quantiles, self.seed)
        model.resize_token_embeddings(self.vocab + self.options.quantiles, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[self.vocab:] = new_rows.to(emb.device)
        self.reward_ids = list(range(self.vocab, self.vocab + self.options.quantiles))
        return model

    def bind_task(self, task: Any, tokenizer: Any) -> None:
        if not (hasattr(task, "prompts") and hasattr(task, "reward")):
            raise UndoError(f"method 'quark' needs prompts and a reward, which task '{task.name}' does not have; "
                            f"use task toxicity")
        if tokenizer.bos_token_id is None:
            raise UndoError("method 'quark' puts its reward token where BOS stands; the tokenizer has no BOS token, "
                            "add one (e.g. tokenizer.bos_token) or use undo's trained tokenizers")
        self.task_obj, self.tok = task, tokenizer

    def own_streams(self, cfg: TrainConfig, seed: int) -> dict[str, QuarkPool]:
        prompts = encode_many(self.tok, self.task_obj.prompts("train"))
        self.pool = QuarkPool(self, prompts, cfg.batch_size, seed)
        return {"quark": self.pool}

    def start(self, model: torch.nn.Module, streams: dict) -> None:
        streams["quark"].policy = model  # the model as it trains: explore steps sample from it

    def loss(self, model: torch.nn.Module, batches: dict[str, Batch]) -> LossOutput:
        b = batches["quark"]
        logits = logits_of(model, b)[..., :self.vocab]  # the policy over the original vocabulary
        ref_logits, flops = frozen_logits(self.reference, {"input_ids": b["ref_input_ids"],
                                                           "attention_mask": b["attention_mask"]})
        loss, logs = quark_loss(logits, ref_logits, b["labels"], self.options.kl_weight, self.options.entropy_weight)
        return LossOutput(loss, logs, flops)

    def export(self, model: torch.nn.Module) -> torch.nn.Module:
        """Conditioned on r_1 for good: r_1's embedding becomes BOS's, the reward rows go."""
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[self.bos_id] = emb[self.reward_ids[0]]
        model.resize_token_embeddings(self.vocab, mean_resizing=False)
        return model

    def report(self) -> dict[str, Any]:
        if self.pool is None:
            return {}
        return {"explore": self.pool.log, "pool_size": len(self.pool.samples), "flops": self.pool.flops}
