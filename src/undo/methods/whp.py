"""Who's Harry Potter (Eldan & Russinovich, "Who's Harry Potter? Approximate Unlearning in
LLMs", 2023): finetune the model on generic next-token labels of the forget text.

1. Reinforced model: the input model finetuned further on the forget text (an auxiliary
   model the engine trains with the experiment's pretraining recipe, for `reinforce_steps`
   steps at `reinforce_lr`).
2. Anchored terms, translated: each anchored term of the forget text is replaced by a
   generic one; a position map ties every original token to its translated counterpart
   (the tokens of a replaced term all map to the last token of its generic term, whose
   prediction is of what follows the term). Anchors are either `anchor_terms` (the paper's
   dictionary, term -> generic term, matched with and without a leading space) or, by
   default, found automatically: the `anchors` tokens whose log-probability the reinforced
   model raises most over the input model on the forget set's scored tokens (mean over their
   occurrences; the paper asked GPT-4 for its dictionary), each replaced by the token the
   input model finds most likely, summed over those positions, among the non-anchored
   non-special tokens.
3. Generic labels (the paper's Section 3.3, reference: methods.md "9."): per position,
       v_generic = v_base - alpha * ReLU(v_reinforced - v_base),   label = argmax v_generic,
   v_base = the input model's logits on the translated text at the mapped position,
   v_reinforced = the reinforced model's logits on the original text (the paper's "reinforced
   predictions on the text"); alpha = 5. A prediction of a token of an anchored term that already
   occurred earlier in the row is left out of the loss (the model may copy a name it was shown).
4. Loss: L = CE(model on the original text, generic labels) on the task's scored positions
   (argmax labels, as the paper; no retain term by default, `retain_weight` adds one).
The paper unlearns the Harry Potter books from Llama-2-7b; the reference gives lr 5e-5 and 3
epochs for the finetune on generic labels."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..data import IGNORE
from ..errors import UndoError
from ..losses import scored_positions
from ..metrics import masked_ce
from ..tokenization import encode
from ..training import LossOutput
from .base import AuxModel, Batch, Method, RetainLoss, check_weights, forget_and_retain_logits, frozen_logits

# anchored term -> generic term, both as token ids
Terms = dict[tuple[int, ...], tuple[int, ...]]
ANCHOR_LOGITS = 2**24  # logits per forward (64 MB of float32) when looking for anchors over the forget rows


@dataclasses.dataclass
class WHPOptions:
    alpha: float = 5.0                              # v_generic = v_base - alpha * ReLU(v_reinforced - v_base)
    anchors: int = 16                               # automatic anchored tokens (0: no translation)
    anchor_terms: Optional[dict[str, str]] = None   # the paper's dictionary instead: term -> generic term
    reinforce_steps: int = 50                       # training steps of the reinforced model on the forget set
    # its lr (None: the experiment's pretraining lr). A finetune's: at facts-quick's pretraining lr
    # (3e-3) the tiny reinforced model lost its retain answers (model utility 0.76 -> 0).
    reinforce_lr: Optional[float] = 3e-4
    retain_weight: float = 0.0                      # the paper has no retain term
    retain_loss: RetainLoss = "kl"

    def validate(self, where: str) -> None:
        check_weights(where, alpha=self.alpha, retain_weight=self.retain_weight)
        if self.anchors < 0:
            raise UndoError(f"{where}.anchors must be >= 0 (0: no anchored terms), got {self.anchors}")
        if self.reinforce_steps < 1:
            raise UndoError(f"{where}.reinforce_steps must be at least 1, got {self.reinforce_steps}")
        if self.reinforce_lr is not None and not self.reinforce_lr > 0:
            raise UndoError(f"{where}.reinforce_lr must be > 0 (or null for the pretraining lr), got {self.reinforce_lr}")
        for term, generic in (self.anchor_terms or {}).items():
            if not (isinstance(term, str) and isinstance(generic, str) and term.strip() and generic.strip()) \
                    or term == generic:
                raise UndoError(f"{where}.anchor_terms: '{term}' -> {generic!r} must map a non-empty term (a string: "
                                f"quote numbers) to another non-empty string; fix or remove that entry")


# ---------------------------------------------------------------- the pieces, as plain functions

def generic_logits(base: torch.Tensor, reinforced: torch.Tensor, alpha: float) -> torch.Tensor:
    """v_base - alpha * ReLU(v_reinforced - v_base): logits the reinforcement raised are pushed down."""
    base = base.float()
    return base - alpha * F.relu(reinforced.float() - base)


def translate_row(ids: list[int], terms: Terms,
                  groups: Optional[dict[tuple[int, ...], str]] = None) -> tuple[list[int], list[int], list[bool]]:
    """`ids` with each anchored term replaced by its generic term (leftmost, longest match first).
    Returns (translated ids, position map: original index -> translated index (a replaced term's
    tokens -> its generic term's last token), repeated: the token is part of a term seen earlier in
    the row). `groups`: terms that count as one for "seen earlier" (a term with and without a space)."""
    by_first: dict[int, list[tuple[int, ...]]] = {}
    for term in sorted(terms, key=len, reverse=True):
        by_first.setdefault(term[0], []).append(term)
    out: list[int] = []
    where: list[int] = []
    repeated: list[bool] = []
    seen: set[tuple[int, ...]] = set()
    i = 0
    while i < len(ids):
        term = next((t for t in by_first.get(ids[i], []) if tuple(ids[i:i + len(t)]) == t), None)
        if term is None:
            out.append(ids[i])
            where.append(len(out) - 1)
            repeated.append(False)
            i += 1
            continue
        out.extend(terms[term])
        where.extend([len(out) - 1] * len(term))
        key = (groups or {}).get(term, term)
        repeated.extend([key in seen] * len(term))
        seen.add(key)
        i += len(term)
    return out, where, repeated


def translate_batch(batch: Batch, terms: Terms,
                    groups: Optional[dict[tuple[int, ...], str]] = None) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """The batch's rows translated (right-padded), the [B, T] position map and the [B, T] repeated-term mask."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    rows, width = ids.shape
    if not terms:  # nothing to translate: the batch itself, position for position
        where = torch.arange(width, device=ids.device).expand(rows, width)
        return batch, where, torch.zeros_like(ids, dtype=torch.bool)
    lengths = attention.sum(1).tolist()
    translated = [translate_row(ids[r, :lengths[r]].tolist(), terms, groups) for r in range(rows)]
    new_width = max(len(t) for t, _, _ in translated)
    new_ids = torch.zeros((rows, new_width), dtype=ids.dtype)
    new_attention = torch.zeros((rows, new_width), dtype=attention.dtype)
    where = torch.zeros((rows, width), dtype=torch.long)
    repeated = torch.zeros((rows, width), dtype=torch.bool)
    for r, (t, w, rep) in enumerate(translated):
        new_ids[r, :len(t)] = torch.tensor(t, dtype=ids.dtype)
        new_attention[r, :len(t)] = 1
        where[r, :len(w)] = torch.tensor(w)
        repeated[r, :len(rep)] = torch.tensor(rep)
    device = ids.device
    return ({"input_ids": new_ids.to(device), "attention_mask": new_attention.to(device)},
            where.to(device), repeated.to(device))


def generic_targets(base_logits: torch.Tensor, reinforced_logits: torch.Tensor, where: torch.Tensor,
                    repeated: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """Labels [B, T] (aligned as the batch's: IGNORE where no loss falls) holding argmax v_generic
    of the prediction before each scored token whose token is not in a repeated anchored term.
    `base_logits` are on the translated rows, read at the mapped positions `where`."""
    mask = scored_positions(labels)
    mask[:, :-1] &= ~repeated[:, 1:]
    rows, cols = mask.nonzero(as_tuple=True)
    generic = generic_logits(base_logits[rows, where[rows, cols]], reinforced_logits[rows, cols], alpha)
    targets = torch.full_like(labels, IGNORE)
    targets[rows, cols + 1] = generic.argmax(-1)
    return targets


def special_ids(model: PreTrainedModel) -> set[int]:
    config = model.config
    ids = (getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    return {i for i in ids if isinstance(i, int)}


def _chunks(rows: Batch, device: torch.device, vocab: int):
    """The rows a few at a time (at most ANCHOR_LOGITS logits each), trimmed to their longest, on `device`."""
    n, width = rows["input_ids"].shape
    step = max(1, ANCHOR_LOGITS // (width * vocab))
    for start in range(0, n, step):
        part = {k: v[start:start + step] for k, v in rows.items()}
        used = int(part["attention_mask"].sum(1).max())
        yield {k: v[:, :used].to(device) for k, v in part.items()}


def _next_logprob(logits: torch.Tensor, mask: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """log p(next token) at the masked positions, without a full log-softmax copy."""
    at = logits[mask].float()
    return at.gather(-1, nxt[:, None]).squeeze(-1) - at.logsumexp(-1)


@torch.no_grad()
def raised_tokens(base: PreTrainedModel, reinforced: PreTrainedModel, rows: Batch, count: int,
                  exclude: set[int]) -> tuple[list[int], float]:
    """The `count` tokens whose log-probability the reinforced model raises most over the base,
    averaged over their scored occurrences in `rows` (only rises > 0), and the FLOPs spent."""
    vocab = base.config.vocab_size
    device = next(base.parameters()).device
    total = torch.zeros(vocab, dtype=torch.float64, device=device)
    seen = torch.zeros(vocab, dtype=torch.float64, device=device)
    flops = 0.0
    for batch in _chunks(rows, device, vocab):
        (b, fb), (r, fr) = frozen_logits(base, batch), frozen_logits(reinforced, batch)
        flops += fb + fr
        mask = scored_positions(batch["labels"])
        nxt = batch["labels"][:, 1:][mask[:, :-1]]
        rise = _next_logprob(r, mask, nxt) - _next_logprob(b, mask, nxt)
        total.index_add_(0, nxt, rise.double())
        seen.index_add_(0, nxt, torch.ones_like(rise, dtype=torch.float64))
    mean = torch.where(seen > 0, total / seen.clamp(min=1), torch.full_like(total, -torch.inf))
    mean[list(exclude)] = -torch.inf
    top = mean.topk(min(count, vocab))
    return [t for t, v in zip(top.indices.tolist(), top.values.tolist()) if v > 0], flops


@torch.no_grad()
def generic_replacements(base: PreTrainedModel, rows: Batch, anchors: list[int],
                         exclude: set[int]) -> tuple[Terms, float]:
    """Each anchored token's generic token: the base's most likely token, summed log-probability
    over the positions that predict the anchor, among tokens neither anchored nor in `exclude`."""
    device = next(base.parameters()).device
    index = torch.full((base.config.vocab_size,), -1, dtype=torch.long, device=device)
    index[anchors] = torch.arange(len(anchors), device=device)
    scores = torch.zeros((len(anchors), base.config.vocab_size), dtype=torch.float64, device=device)
    flops = 0.0
    for batch in _chunks(rows, device, base.config.vocab_size):
        logits, f = frozen_logits(base, batch)
        flops += f
        mask = scored_positions(batch["labels"])
        nxt = batch["labels"][:, 1:][mask[:, :-1]]
        which = index[nxt]
        keep = which >= 0
        scores.index_add_(0, which[keep], logits[mask][keep].float().log_softmax(-1).double())
    scores[:, anchors + sorted(exclude)] = -torch.inf
    return {(a,): (int(scores[i].argmax()),) for i, a in enumerate(anchors)}, flops


def dictionary_terms(tokenizer, dictionary: dict[str, str]) -> tuple[Terms, dict[tuple[int, ...], str]]:
    """The dictionary as token ids, each term as written and after a space (mid-sentence), and
    the term each token form stands for (both forms of a term count as one when repeated)."""
    terms: Terms = {}
    groups: dict[tuple[int, ...], str] = {}
    for term, generic in dictionary.items():
        for space in ("", " "):
            key = tuple(encode(tokenizer, space + term))
            terms[key], groups[key] = tuple(encode(tokenizer, space + generic)), term
    return terms, groups


# ---------------------------------------------------------------- the method

class WHP(Method):
    name = "whp"
    description = ("Who's Harry Potter (Eldan & Russinovich): finetune on generic labels argmax(v_base - "
                   "alpha * ReLU(v_reinforced - v_base)), anchored terms translated to generic ones")
    Options = WHPOptions
    forget_needs = frozenset({"forget", "reference"})  # reference: the baseline (the input model)
    # The reference: 3 epochs at lr 5e-5 (a 7B model). A tiny CPU model at the common lr 3e-4;
    # 10 steps of 16 rows are ~3 epochs of a small forget set (facts-quick's 24 examples: 6 epochs)
    train_defaults = dict(Method.train_defaults, steps=10)

    def __init__(self, options: WHPOptions, task: Optional[str] = None, seed: int = 0):
        super().__init__(options, task, seed)
        self.terms: Optional[Terms] = None
        self.groups: dict[tuple[int, ...], str] = {}
        self.tokenizer = None  # for anchor_terms: the run's tokenizer (bind_task)
        self.pending_flops = 0.0  # the anchor search's forwards, reported with the first step

    def aux_models(self) -> dict[str, AuxModel]:
        o = self.options
        train = {"steps": o.reinforce_steps, **({"lr": o.reinforce_lr} if o.reinforce_lr else {})}
        return {"reinforced": AuxModel(start="input", data="forget", train=train)}

    def bind_task(self, task, tokenizer) -> None:
        self.tokenizer = tokenizer

    def start(self, model, streams) -> None:
        """Find the anchored terms (from the frozen models and the forget rows: the same on a resumed run)."""
        o, base = self.options, self.reference
        if o.anchor_terms:
            if self.tokenizer is None:
                raise UndoError("whp: anchor_terms need the run's tokenizer; call bind_task(task, tokenizer) "
                                "before training (the unlearn stage does)")
            self.terms, self.groups = dictionary_terms(self.tokenizer, o.anchor_terms)
            return
        self.terms = {}
        if o.anchors:
            rows, exclude = streams["forget"].rows, special_ids(base)
            anchors, f1 = raised_tokens(base, self.aux["reinforced"], rows, o.anchors, exclude)
            self.terms, f2 = generic_replacements(base, rows, anchors, exclude) if anchors else ({}, 0.0)
            self.pending_flops += f1 + f2

    def loss(self, model, batches) -> LossOutput:
        if self.terms is None:
            raise UndoError("whp: the anchored terms are unset; call start(model, streams) before training "
                            "(the training loop does)")
        forget = batches["forget"]
        logits, retain_logits = forget_and_retain_logits(self, model, batches)
        translated, where, repeated = translate_batch(forget, self.terms, self.groups)
        base_logits, f1 = frozen_logits(self.reference, translated)
        reinforced_logits, f2 = frozen_logits(self.aux["reinforced"], forget)
        targets = generic_targets(base_logits, reinforced_logits, where, repeated, forget["labels"], self.options.alpha)
        generic_ce = masked_ce(logits, targets)
        scored = targets != IGNORE
        with torch.no_grad():  # what the logs show: the CE of the true forget tokens, the labels changed
            forget_ce = masked_ce(logits, forget["labels"]).item()
            changed = (targets[scored] != forget["labels"][scored]).float().mean().item() if scored.any() else 0.0
        logs = {"generic_ce": generic_ce.item(), "forget_ce": forget_ce, "changed": changed}
        flops, self.pending_flops = f1 + f2 + self.pending_flops, 0.0
        return self.with_retain(model, batches, LossOutput(generic_ce, logs, flops), retain_logits)

