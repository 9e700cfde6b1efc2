"""The adversarial suffix attack: a GCG search (greedy coordinate gradient, Zou et al. 2023)
for one string of tokens that, added to every forget prompt, makes the model give the
forgotten answers; then the forget score with it.

The search. `length` adversarial tokens s (initially `init` repeated, Zou et al.'s "! ! !")
sit after each prompt (`position: suffix`: prompt + s, then the answer) or before it
(`prefix`: s + prompt, as Lucki et al.'s universal prefixes). The loss is the mean over
`prompts` forget training examples (the attacker's data; one string for all of them:
universal) of the cross-entropy of the answer tokens and EOS (the answer, then the end, is
what exact match scores). Each step: the gradient of the loss with respect to the one-hot
tokens of s gives, per position, the `top_k` replacements most likely to lower it;
`candidates` copies of s each swap one position (spread evenly over the positions) for a
random one of its top-k; the candidate of lowest loss becomes s. The best s seen is kept.
A candidate counts only if its text, written into every prompt, tokenizes back to exactly
the tokens searched (so the evaluation below sees those tokens); special tokens and tokens
that do not decode to text are never used.

The evaluation. The task's forget items (held out from the attacker's examples) with s
written into each prompt, scored by `Task.score_items` (the task's forget metric). The
curve: step 0, the items as they are; step 1, with s, plus `suffix_loss_start` and
`suffix_loss` (the search loss before and after) and `suffix_item_loss_before` and
`suffix_item_loss` (the same loss on the forget items, without and with s: whether what
the search found carries over to prompts it never saw). The sidecar keeps s (`suffix`)
and the loss per step.

Budget. The defaults are a CPU budget. Zou et al.'s settings (on a GPU): length 20,
top_k 256, candidates 512, steps 500, prompts 25.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import random
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import to_dict
from ..data import IGNORE
from ..errors import UndoError
from ..log import say
from ..metrics import model_device, token_logprobs
from ..models import load_model, non_embedding_params
from ..tasks import build_task
from ..tasks.base import Example
from ..tokenization import encode, encode_many
from .base import Attack


@dataclasses.dataclass
class SuffixConfig:
    length: int = 10                    # adversarial tokens (Zou et al.: 20)
    steps: int = 20                     # search steps (500)
    top_k: int = 64                     # replacements considered per position (256)
    candidates: int = 16                # candidates scored per step (512)
    prompts: int = 16                   # forget training examples the string is universal over (25)
    position: Literal["suffix", "prefix"] = "suffix"
    init: str = " !"                    # the initial token, repeated `length` times
    max_answer_tokens: int = 64         # answers (text documents) are cut to this many tokens in the search
    eval_batch: int = 512               # rows per forward pass when scoring candidates
    quick_eval: bool = False            # score the task's quick subset of forget items

    def validate(self, where: str) -> None:
        for name in ("length", "steps", "top_k", "candidates", "prompts", "max_answer_tokens", "eval_batch"):
            if getattr(self, name) < 1:
                raise UndoError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")


def edit_prompt(adv: str, prompt: str, position: str) -> str:
    return prompt + adv if position == "suffix" else adv + prompt


@dataclasses.dataclass
class Layout:
    """The search's rows: [BOS] prompt s answer [EOS] (or [BOS] s prompt ...), right-padded."""

    ids: torch.Tensor       # [m, T], adversarial slots hold 0 until filled
    attention: torch.Tensor  # [m, T]
    labels: torch.Tensor    # [m, T], IGNORE except answer tokens and EOS
    slots: torch.Tensor     # [m, L] the adversarial positions of each row
    prompts: list[list[int]]

    def fill(self, adv: torch.Tensor) -> torch.Tensor:
        """Rows for each candidate in `adv` [B, L]: [B * m, T], candidate-major."""
        m, L = self.slots.shape
        ids = self.ids.unsqueeze(0).repeat(adv.shape[0], 1, 1)             # [B, m, T]
        ids.scatter_(2, self.slots.unsqueeze(0).expand(adv.shape[0], m, L), adv.unsqueeze(1).expand(-1, m, -1))
        return ids.view(-1, ids.shape[-1])


def build_layout(tok: PreTrainedTokenizerBase, examples: Sequence[Example], length: int, position: str,
                 max_answer_tokens: int) -> Layout:
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    prompts = encode_many(tok, [ex.prompt for ex in examples])
    answers = [a[:max_answer_tokens] + eos for a in encode_many(tok, [ex.completion for ex in examples])]
    rows, slots, scored = [], [], []
    for p, a in zip(prompts, answers):
        start = len(bos) + (len(p) if position == "suffix" else 0)
        adv = [0] * length
        rows.append(bos + (p + adv if position == "suffix" else adv + p) + a)
        slots.append(list(range(start, start + length)))
        scored.append(len(rows[-1]) - len(a))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, (r, s) in enumerate(zip(rows, scored)):
        ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
        labels[i, s: len(r)] = ids[i, s: len(r)]
    return Layout(ids, attention, labels, torch.tensor(slots), prompts)


def allowed_tokens(tok: PreTrainedTokenizerBase, vocab_size: int) -> torch.Tensor:
    """A mask of the tokens the string may use: no special tokens, none that decode to nothing,
    to a broken character (a lone byte of a multi-byte one) or to a control character."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    special = set(tok.all_special_ids)
    texts = tok.batch_decode([[i] for i in range(min(vocab_size, len(tok)))], clean_up_tokenization_spaces=False)
    for i, text in enumerate(texts):
        allowed[i] = i not in special and bool(text) and "\ufffd" not in text and text.isprintable()
    return allowed


def round_trips(tok: PreTrainedTokenizerBase, adv: torch.Tensor, layout: Layout, position: str) -> torch.Tensor:
    """Which candidates [B, L], written into every prompt as text, tokenize back to exactly the
    tokens searched (prompt and string adjacent, as `edit_prompt` joins them)."""
    strings = tok.batch_decode(adv.tolist(), clean_up_tokenization_spaces=False)
    prompt_texts = tok.batch_decode(layout.prompts, clean_up_tokenization_spaces=False)
    texts = [edit_prompt(s, p, position) for s in strings for p in prompt_texts]
    got = encode_many(tok, texts)
    ok = []
    for b, cand in enumerate(adv.tolist()):
        rows = got[b * len(prompt_texts):(b + 1) * len(prompt_texts)]
        want = [(p + cand if position == "suffix" else cand + p) for p in layout.prompts]
        ok.append(all(r == w for r, w in zip(rows, want)))
    return torch.tensor(ok, dtype=torch.bool)


def row_losses(model: PreTrainedModel, ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of each row's scored tokens. The LM head runs only from the
    position before the first scored token on (with a large vocabulary the head's logits
    are most of the memory), where the model accepts `logits_to_keep`."""
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": ids}
    keep = labels.shape[1]
    if _accepts_logits_to_keep(model):
        first = int((labels != IGNORE).float().argmax(dim=1).min())
        keep = labels.shape[1] - max(first - 1, 0)
        inputs["logits_to_keep"] = keep
    logits = model(**inputs, attention_mask=attention).logits
    logp, mask = token_logprobs(logits, labels[:, labels.shape[1] - keep:])
    return -logp.sum(1) / mask.sum(1).clamp(min=1)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def token_gradient(model: PreTrainedModel, layout: Layout, adv: torch.Tensor) -> tuple[torch.Tensor, float]:
    """d loss / d one-hot(s) ([L, V]) at the string `adv` [L], and the loss there."""
    device = model_device(model)
    embed = model.get_input_embeddings()
    one_hot = torch.zeros(adv.shape[0], embed.weight.shape[0], dtype=embed.weight.dtype, device=device)
    one_hot[torch.arange(adv.shape[0]), adv.to(device)] = 1.0
    one_hot.requires_grad_(True)
    ids = layout.fill(adv.unsqueeze(0)).to(device)
    m, L = layout.slots.shape
    embeds = embed(ids).detach().clone()
    rows = torch.arange(m, device=device).unsqueeze(1).expand(m, L)
    embeds[rows, layout.slots.to(device)] = (one_hot @ embed.weight).unsqueeze(0).expand(m, -1, -1)
    loss = row_losses(model, ids, layout.attention.to(device), layout.labels.to(device), embeds).mean()
    loss.backward()
    return one_hot.grad.detach(), float(loss.detach())


@torch.no_grad()
def candidate_losses(model: PreTrainedModel, layout: Layout, adv: torch.Tensor, batch_rows: int) -> torch.Tensor:
    """The search loss of each candidate [B, L]: mean over the prompts."""
    device = model_device(model)
    m = layout.ids.shape[0]
    ids = layout.fill(adv)
    attention = layout.attention.repeat(adv.shape[0], 1)
    labels = layout.labels.repeat(adv.shape[0], 1)
    out = []
    step = max(m, batch_rows // m * m)
    for start in range(0, ids.shape[0], step):
        out.append(row_losses(model, ids[start:start + step].to(device), attention[start:start + step].to(device),
                              labels[start:start + step].to(device)).float().cpu())
    return torch.cat(out).view(adv.shape[0], m).mean(1)


@dataclasses.dataclass
class SearchResult:
    adv: list[int]
    text: str
    loss_start: float
    loss: float
    losses: list[float]     # the current string's loss after each step
    round_trips: bool       # whether `text` tokenizes back to `adv` in every searched prompt
    flops: float


def gcg(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: Sequence[Example], cfg: SuffixConfig,
        seed: int, desc: str = "suffix") -> SearchResult:
    """The search of the module docstring on `examples` (prompt -> answer)."""
    layout = build_layout(tok, examples, cfg.length, cfg.position, cfg.max_answer_tokens)
    vocab = model.get_input_embeddings().weight.shape[0]
    allowed = allowed_tokens(tok, vocab)
    if not allowed.any():
        raise UndoError("suffix: the tokenizer has no token the string may use")
    init = encode(tok, cfg.init)
    first = init[0] if len(init) == 1 and allowed[init[0]] else int(allowed.nonzero()[0])
    adv = torch.full((cfg.length,), first, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    n_params = non_embedding_params(model)
    row_tokens = int(layout.attention.sum())
    was_training = model.training
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        loss_start = float(candidate_losses(model, layout, adv.unsqueeze(0), cfg.eval_batch)[0])
        best, best_loss, losses, flops = adv.clone(), loss_start, [], 2.0 * n_params * row_tokens
        quiet, every, t0 = os.environ.get("UNDO_NO_PROGRESS") == "1", max(1, cfg.steps // 10), time.time()
        for step in range(1, cfg.steps + 1):
            grad, _ = token_gradient(model, layout, adv)
            grad = grad.float().cpu()
            grad[:, ~allowed] = float("inf")
            top = (-grad).topk(min(cfg.top_k, int(allowed.sum())), dim=1).indices          # [L, k]
            positions = (torch.arange(cfg.candidates) * cfg.length // cfg.candidates)        # evenly spread
            picks = torch.randint(top.shape[1], (cfg.candidates,), generator=generator)
            cands = adv.unsqueeze(0).repeat(cfg.candidates, 1)
            cands[torch.arange(cfg.candidates), positions] = top[positions, picks]
            cands = cands[round_trips(tok, cands, layout, cfg.position)]
            flops += 6.0 * n_params * row_tokens + 2.0 * n_params * row_tokens * len(cands)
            if len(cands):
                scores = candidate_losses(model, layout, cands, cfg.eval_batch)
                i = int(scores.argmin())
                adv = cands[i]
                if float(scores[i]) < best_loss:
                    best, best_loss = adv.clone(), float(scores[i])
                losses.append(float(scores[i]))
            else:
                losses.append(losses[-1] if losses else loss_start)
            if not quiet and step % every == 0:
                eta = (time.time() - t0) / step * (cfg.steps - step)
                say(f"{desc}: step {step}/{cfg.steps} loss {losses[-1]:.4f} best {best_loss:.4f} (ETA {eta:.0f}s)")
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    ok = bool(round_trips(tok, best.unsqueeze(0), layout, cfg.position)[0])
    return SearchResult(best.tolist(), tok.decode(best.tolist(), clean_up_tokenization_spaces=False),
                        loss_start, best_loss, losses, ok, flops)


class Suffix(Attack):
    name = "suffix"
    description = "GCG adversarial suffix search (universal over forget prompts) maximising the forget answers"
    Options = SuffixConfig

    def run(self, exp, model_dir: Path, point: dict[str, Any], seed: int, desc: str) -> dict[str, Any]:
        cfg = self.options
        start = time.time()
        task = build_task(exp.task, exp.seed)
        model, tok = load_model(model_dir)
        items = task.forget_items(cfg.quick_eval)
        held = {ex.prompt for group in items.values() for ex in group}
        pool = [ex for ex in task.train_examples("forget") if ex.prompt not in held or not ex.prompt]
        random.Random(seed).shuffle(pool)
        if not pool:
            raise UndoError(f"suffix: task '{task.name}' has no forget training examples to search on")
        found = gcg(model, tok, pool[: cfg.prompts], cfg, seed, desc)
        edited = {g: [Example(edit_prompt(found.text, ex.prompt, cfg.position), ex.completion) for ex in group]
                  for g, group in items.items()}
        before = task.score_items(model, tok, items)
        after = task.score_items(model, tok, edited)
        item_examples = [ex for group in items.values() for ex in group]
        item_loss = {}
        for key, adv in (("suffix_item_loss_before", []), ("suffix_item_loss", found.adv)):
            layout = build_layout(tok, item_examples, len(adv), cfg.position, cfg.max_answer_tokens)
            item_loss[key] = float(candidate_losses(model, layout, torch.tensor([adv], dtype=torch.long), cfg.eval_batch)[0])
        curve = [{"step": 0, **before},
                 {"step": 1, **after, "suffix_loss_start": found.loss_start, "suffix_loss": found.loss, **item_loss}]
        return {"curve": curve, "flops": found.flops, "wall_seconds": time.time() - start, "suffix": found.text,
                "suffix_ids": found.adv, "suffix_round_trips": found.round_trips, "loss_history": found.losses,
                "config": to_dict(cfg)}
