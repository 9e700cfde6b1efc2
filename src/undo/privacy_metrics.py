"""Privacy metrics: memorisation, extraction, canary exposure, membership inference.

What the privacy literature reports, on sequences a model may have memorised:
- MA (memorisation accuracy, Jang et al. 2023): the share of positions t >= 1 whose greedy
  next token is the true one, MA(x) = mean_t 1[argmax p(.|x_<t) = x_t].
- EL_n (extraction likelihood, Jang et al.): EL_n(x) = 1/(T-n) * sum_{t=1}^{T-n}
  OVERLAP_n(greedy continuation of x_<t, x_>=t), OVERLAP_n(a, b) = the share of b's n-grams
  (the true suffix's) that occur in a; the continuation is as long as the suffix. n = 10.
- S-MA / S-EL_n (SeUL, Wang et al. 2024): the same over the tokens of sensitive spans only;
  near the end of a sequence, where fewer than n tokens follow, S-EL uses n-grams of the
  length that is left, so every sensitive token counts.
- Canary exposure (Carlini et al. 2019): log2 |R| - log2 rank(secret), the rank by the
  secret's negative log-likelihood among all candidate secrets R given the canary's prefix;
  exact when |R| is small, else -log2 CDF(nll(secret)) of a skew-normal fitted to the NLLs
  of sampled candidates (their estimate). Greedy extraction: the secret decoded exactly.
- Membership inference, members (trained) vs non-members (unseen), as ROC AUC
  (sklearn's roc_auc_score; higher score = "member"): LOSS (-mean NLL), zlib (-mean NLL /
  zlib-compressed bytes, Carlini et al. 2021), Min-K% (mean of the k% lowest token
  log-probs, Shi et al. 2024), Min-K%++ (the same over (log p - mu) / sigma, mu and sigma
  the mean and s.d. of log p(z) for z drawn from the model's own next-token distribution,
  Zhang et al. 2024). MUSE's PrivLeak = (AUC_model - AUC_oracle) / AUC_oracle.
- Perplexity: exp of the mean NLL per scored token.

Positions: a sequence is [BOS] + context + text tokens; position t scores token t given the
tokens before it. The first scored position (`Encoded.first`) is the second text token for
plain documents (Jang et al. score from x_1: x_0 has no context) and the first completion
token when a prompt comes before the text. Pure functions take plain lists, so each is
checked by hand in tests/test_privacy.py; the model-facing ones batch the work.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import zlib
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import UndoError
from .metrics import model_device

Span = tuple[int, int]  # [start, end) character offsets
GENERATE_BATCH = 256    # greedy continuations per generate call (short sequences: cheap rows)


# ---------------------------------------------------------------- encoding with spans


@dataclasses.dataclass
class Encoded:
    """A sequence as the model sees it, and which of its tokens are scored and sensitive."""
    ids: list[int]              # [BOS] + context + text tokens (no EOS: the text is what is memorised)
    first: int                  # first scored position
    sensitive: list[bool]       # per token: inside a sensitive span of the text


def encode_with_offsets(tok: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[Span]]:
    """Token ids of `text` (no special tokens, the ids `tokenization.encode` gives) and each
    token's character span."""
    if not getattr(tok, "is_fast", False):
        raise UndoError("privacy metrics need a fast (Rust) tokenizer for character offsets; "
                        "use a tokenizer.json tokenizer (every tokenizer undo trains is one)")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def span_token_mask(offsets: Sequence[Span], spans: Sequence[Span]) -> list[bool]:
    """Per token: whether its characters overlap any span (a token half inside a span counts)."""
    return [any(s < span_end and span_start < e for span_start, span_end in spans) for s, e in offsets]


def encode_sequence(tok: PreTrainedTokenizerBase, text: str, spans: Sequence[Span] = (), prompt: str = "") -> Encoded:
    """[BOS] + prompt + text, scored from the second text token (no prompt) or the first one."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    context = list(tok(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    ids, offsets = encode_with_offsets(tok, text)
    head = bos + context
    first = len(head) + (0 if context else 1)
    return Encoded(head + ids, max(first, 1), [False] * len(head) + span_token_mask(offsets, spans))


# ---------------------------------------------------------------- per-token statistics


@dataclasses.dataclass
class TokenStats:
    """Per position t of a sequence (index 0 is never scored and holds 0): log p(x_t | x_<t),
    whether x_t is the greedy choice, and the mean and s.d. of log p(z), z ~ p(. | x_<t)."""
    logp: np.ndarray
    hit: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def row_stats(logits: torch.Tensor, target: torch.Tensor) -> TokenStats:
    """TokenStats of one sequence from its logits [T-1, vocab] and next tokens [T-1]."""
    logp_all = F.log_softmax(logits, dim=-1)
    probs = logp_all.exp()
    mu = (probs * logp_all).sum(-1)
    sigma = ((probs * logp_all.square()).sum(-1) - mu.square()).clamp(min=0).sqrt()
    columns = (logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1), logits.argmax(-1) == target, mu, sigma)
    # index 0 holds 0: the first token has no prediction
    padded = [np.concatenate([[0], c.cpu().numpy()]) for c in columns]
    return TokenStats(padded[0].astype(np.float64), padded[1].astype(bool), padded[2].astype(np.float64),
                      padded[3].astype(np.float64))


@torch.no_grad()
def token_stats(model: PreTrainedModel, sequences: Sequence[Sequence[int]], pad_id: int,
                batch_size: int = 32) -> list[TokenStats]:
    """`TokenStats` of each sequence, from one forward per batch (right-padded)."""
    device, was_training = model_device(model), model.training
    model.eval()
    out: list[TokenStats] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[i, :len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i, s in enumerate(chunk):  # a row at a time: one [T, vocab] float32 tensor, not [B, T, vocab]
            out.append(row_stats(logits[i, :len(s) - 1].float(), ids[i, 1:len(s)].to(device)))
    model.train(was_training)
    return out


# ---------------------------------------------------------------- memorisation and extraction


def memorization_accuracy(hit: Sequence[bool], positions: Sequence[int]) -> float:
    """MA over `positions`: the share whose greedy next token is the true one (nan if none)."""
    return float(np.mean([bool(hit[t]) for t in positions])) if len(positions) else float("nan")


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def ngram_overlap(generated: Sequence[int], truth: Sequence[int], n: int) -> float:
    """OVERLAP_n: the share of `truth`'s n-grams (with repeats) that occur among `generated`'s."""
    wanted = ngrams(truth, n)
    if not wanted:
        raise UndoError(f"ngram_overlap: the true text has {len(truth)} tokens, fewer than n = {n}")
    have = set(ngrams(generated, n))
    return sum(g in have for g in wanted) / len(wanted)


@torch.no_grad()
def greedy_continuations(model: PreTrainedModel, requests: Sequence[tuple[Sequence[int], int]], pad_id: int,
                         eos_id: Optional[int], batch_size: int = 128) -> list[list[int]]:
    """For each (prefix ids, k): the model's greedy k next tokens (fewer if it ends with EOS).
    Requests are batched by length (left padding, a KV cache)."""
    device, was_training = model_device(model), model.training
    model.eval()
    out: list[list[int]] = [[] for _ in requests]
    # similar lengths together: every row of a batch generates about as many tokens as it needs
    order = sorted(range(len(requests)), key=lambda i: (requests[i][1], len(requests[i][0])))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_padded([requests[i][0] for i in chunk], pad_id)
        new = max(requests[i][1] for i in chunk)
        if new == 0:
            continue
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                             min_new_tokens=0, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)
        for row, i in zip(gen[:, ids.shape[1]:].tolist(), chunk):
            row = row[:requests[i][1]]
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id)]
            out[i] = row
    model.train(was_training)
    return out


def el_positions(seq: Encoded, n: int) -> list[int]:
    """The positions EL_n averages over: t = first .. T - n (at least n true tokens follow)."""
    return list(range(seq.first, len(seq.ids) - n + 1))


def sensitive_positions(seq: Encoded) -> list[int]:
    return [t for t in range(seq.first, len(seq.ids)) if seq.sensitive[t]]


def extraction_scores(seq: Encoded, continuations: dict[int, list[int]], n: int,
                      max_tokens: Optional[int] = None, sensitive: bool = True) -> tuple[float, float]:
    """(EL_n, S-EL_n) of one sequence from the greedy continuations at its positions
    (`continuations[t]` continues ids[:t]); nan where a sequence has no such position (S-EL_n:
    also without `sensitive`). `max_tokens` compares at most that many tokens of each suffix
    (None: all, as Jang et al.)."""
    def overlap(t: int, m: int) -> float:
        truth = seq.ids[t:] if max_tokens is None else seq.ids[t:t + max_tokens]
        return ngram_overlap(continuations[t], truth, min(m, len(truth)))

    el = [overlap(t, n) for t in el_positions(seq, n)]
    sel = [overlap(t, n) for t in sensitive_positions(seq)] if sensitive else []  # n shrinks near the end
    return (float(np.mean(el)) if el else float("nan"), float(np.mean(sel)) if sel else float("nan"))


def continuation_requests(seq: Encoded, n: int, sensitive: bool, max_tokens: Optional[int]) -> dict[int, int]:
    """Position -> continuation length that EL_n (and S-EL_n, if `sensitive`) of `seq` need."""
    positions = set(el_positions(seq, n)) | (set(sensitive_positions(seq)) if sensitive else set())
    T = len(seq.ids)
    return {t: T - t if max_tokens is None else min(T - t, max_tokens) for t in sorted(positions)}


def shared_continuations(hit: Sequence[bool], wanted: dict[int, int]) -> tuple[dict[int, int], dict[int, int]]:
    """Which greedy continuations must be generated for `wanted` (position -> length) and which
    follow from others. Where the greedy next token at t is the true one (hit[t]), greedy
    decoding from ids[:t] emits ids[t] and then continues exactly as from ids[:t+1], so
    cont(t) = [ids[t]] + cont(t+1): only the misses are generated (a memorised sequence needs
    almost none). Returns (all positions needed -> length, those to generate -> length)."""
    needed = dict(wanted)
    for t in range(len(hit)):  # ascending: a hit passes its need on to t + 1
        if t in needed and hit[t] and needed[t] > 1:
            needed[t + 1] = max(needed.get(t + 1, 0), needed[t] - 1)
    return needed, {t: k for t, k in needed.items() if not hit[t]}


def assemble_continuations(seq: Encoded, hit: Sequence[bool], needed: dict[int, int],
                           generated: dict[int, list[int]]) -> dict[int, list[int]]:
    """cont(t) for every needed t, from the generated ones (see `shared_continuations`)."""
    conts: dict[int, list[int]] = {}
    for t in sorted(needed, reverse=True):
        rest = conts[t + 1][:needed[t] - 1] if hit[t] and needed[t] > 1 else []
        conts[t] = [seq.ids[t]] + rest if hit[t] else generated[t]
    return conts


def sequence_metrics(model: PreTrainedModel, tok: PreTrainedTokenizerBase, seqs: Sequence[Encoded], n: int = 10,
                     sensitive: bool = True, max_tokens: Optional[int] = None, batch_size: int = 64,
                     extraction: "bool | Sequence[bool]" = True) -> tuple[list[dict[str, float]], list[TokenStats]]:
    """Per sequence: ma, el_n, nll (summed over scored positions), tokens (their number) and,
    if `sensitive`, sma, sel_n; and each sequence's `TokenStats`. Without `extraction` (for all
    sequences, or per sequence) no continuation is generated (the costly part): el_n, sel_n nan.
    The continuations of all sequences are generated together (full batches)."""
    stats = token_stats(model, [s.ids for s in seqs], tok.pad_token_id, batch_size)
    extract = [extraction] * len(seqs) if isinstance(extraction, bool) else list(extraction)
    plans = [shared_continuations(st.hit, continuation_requests(s, n, sensitive, max_tokens) if x else {})
             for s, st, x in zip(seqs, stats, extract)]
    flat = [(i, t) for i, (_, generate) in enumerate(plans) for t in generate]
    outs = greedy_continuations(model, [(seqs[i].ids[:t], plans[i][1][t]) for i, t in flat],
                                tok.pad_token_id, tok.eos_token_id, batch_size=GENERATE_BATCH)
    generated: list[dict[int, list[int]]] = [{} for _ in seqs]
    for (i, t), c in zip(flat, outs):
        generated[i][t] = c
    out = []
    for seq, st, plan, gen, x in zip(seqs, stats, plans, generated, extract):
        el, sel = (extraction_scores(seq, assemble_continuations(seq, st.hit, plan[0], gen), n, max_tokens, sensitive)
                   if x else (float("nan"), float("nan")))
        scored = list(range(seq.first, len(seq.ids)))
        row = {"ma": memorization_accuracy(st.hit, scored), "el": el,
               "nll": -float(st.logp[scored].sum()) if scored else 0.0, "tokens": float(len(scored))}
        if sensitive:
            row["sma"] = memorization_accuracy(st.hit, sensitive_positions(seq))
            row["sel"] = sel
        out.append(row)
    return out, stats


def extraction_requests(seq: Encoded, groups: Sequence[Sequence[int]]) -> list[tuple[list[int], list[int]]]:
    """(prefix, target) pairs for greedy extraction of each group of positions of `seq`."""
    return [(seq.ids[:g[0]], [seq.ids[t] for t in g]) for g in groups if g and g[0] >= 1]


def sensitive_groups(seq: Encoded) -> list[list[int]]:
    """The runs of consecutive sensitive positions (one per span, unless spans touch)."""
    groups: list[list[int]] = []
    for t in range(1, len(seq.ids)):
        if seq.sensitive[t]:
            if groups and groups[-1][-1] == t - 1:
                groups[-1].append(t)
            else:
                groups.append([t])
    return groups


def greedy_extraction_rate(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                           requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 128) -> float:
    """The share of (prefix, target) pairs whose target the model decodes greedily, exactly."""
    if not requests:
        return float("nan")
    conts = greedy_continuations(model, [(p, len(t)) for p, t in requests], tok.pad_token_id, tok.eos_token_id,
                                 batch_size)
    return float(np.mean([list(c) == list(t) for c, (_, t) in zip(conts, requests)]))


# ---------------------------------------------------------------- canary exposure


def secret_candidates(secret: str, alphabet: str, exact_max: int, samples: int,
                      rng: random.Random) -> tuple[list[str], int, bool]:
    """Candidate secrets of `secret`'s shape: each character of `alphabet` replaced by any of
    them, the others kept. Returns (candidates, |R|, exact): every candidate but the secret
    itself when |R| <= exact_max, else `samples` random draws (the skew-normal sample)."""
    slots = [i for i, ch in enumerate(secret) if ch in alphabet]
    if not slots:
        raise UndoError(f"canary secret {secret!r} has no character of its alphabet {alphabet!r}")
    space = len(alphabet) ** len(slots)

    def fill(chars: Sequence[str]) -> str:
        out = list(secret)
        for i, ch in zip(slots, chars):
            out[i] = ch
        return "".join(out)

    if space <= exact_max:
        every = (fill(p) for p in itertools.product(alphabet, repeat=len(slots)))
        return [c for c in every if c != secret], space, True
    return [fill([rng.choice(alphabet) for _ in slots]) for _ in range(samples)], space, False


def exposure_from_rank(rank: int, space: int) -> float:
    """Carlini et al.: log2 |R| - log2 rank (rank 1: the secret is the likeliest candidate)."""
    return math.log2(space) - math.log2(rank)


def exact_rank(secret_nll: float, candidate_nlls: Sequence[float]) -> int:
    """1 + the number of other candidates strictly likelier than the secret."""
    return 1 + int(sum(c < secret_nll for c in candidate_nlls))


def skewnorm_exposure(secret_nll: float, sample_nlls: Sequence[float], space: int) -> float:
    """Carlini et al.'s estimate: -log2 of the fitted skew-normal's CDF at the secret's NLL
    (the share of the candidate space likelier than the secret), at most log2 |R|."""
    from scipy.stats import skewnorm

    a, loc, scale = skewnorm.fit(np.asarray(sample_nlls, dtype=np.float64))
    share = float(skewnorm.cdf(secret_nll, a, loc=loc, scale=scale))
    return min(-math.log2(max(share, 1e-300)), math.log2(space))


@torch.no_grad()
def secret_nlls(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str], secret: Span,
                batch_size: int = 256) -> list[float]:
    """NLL (nats) of the secret's tokens given what comes before them, for each text: the canary
    with one candidate secret in place (every text has the secret at `secret` offsets)."""
    seqs = [encode_sequence(tok, text, [secret]) for text in texts]
    for text, seq in zip(texts, seqs):
        if not any(seq.sensitive[1:]):
            raise UndoError(f"canary {text!r}: its secret (characters {secret[0]}-{secret[1]}) covers no token")
    device, was_training = model_device(model), model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(s.ids) for s in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, s in enumerate(chunk):
            ids[i, :len(s.ids)] = torch.tensor(s.ids)
            scored[i, :len(s.ids)] = torch.tensor(s.sensitive)
        lengths = torch.tensor([len(s.ids) for s in chunk])
        mask = torch.arange(width)[None, :] < lengths[:, None]  # right padding: attend to the real tokens
        logits = model(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits[:, :-1].float()
        logp = F.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
        out += (-(logp * scored[:, 1:].to(device)).sum(-1)).tolist()
    model.train(was_training)
    return out


def canary_exposure(model: PreTrainedModel, tok: PreTrainedTokenizerBase, text: str, secret: Span, alphabet: str,
                    exact_max: int, samples: int, seed: int, batch_size: int = 256) -> float:
    """Exposure of one canary: exact rank when |R| <= exact_max, else the skew-normal estimate
    from `samples` random candidates (seeded)."""
    start, end = secret
    candidates, space, exact = secret_candidates(text[start:end], alphabet, exact_max, samples, random.Random(seed))
    texts = [text] + [text[:start] + c + text[end:] for c in candidates]
    nlls = secret_nlls(model, tok, texts, secret, batch_size)
    if exact:
        return exposure_from_rank(exact_rank(nlls[0], nlls[1:]), space)
    return skewnorm_exposure(nlls[0], nlls[1:], space)


# ---------------------------------------------------------------- membership inference


def loss_score(logp: Sequence[float]) -> float:
    """LOSS attack: the negative mean NLL (higher: more likely a member)."""
    return float(np.mean(logp))


def zlib_score(logp: Sequence[float], text: str) -> float:
    """zlib attack: -(mean NLL) / (bytes of the zlib-compressed text)."""
    return float(np.mean(logp)) / len(zlib.compress(text.encode("utf-8")))


def lowest_mean(values: Sequence[float], fraction: float) -> float:
    """Mean of the lowest `fraction` of `values` (at least one)."""
    k = max(1, int(len(values) * fraction))
    return float(np.mean(np.sort(np.asarray(values, dtype=np.float64))[:k]))


def min_k_score(logp: Sequence[float], fraction: float = 0.2) -> float:
    """Min-K%: the mean of the k% lowest token log-probs."""
    return lowest_mean(logp, fraction)


def min_k_plus_plus_score(logp: Sequence[float], mu: Sequence[float], sigma: Sequence[float],
                          fraction: float = 0.2) -> float:
    """Min-K%++: the mean of the k% lowest (log p - mu) / sigma."""
    z = (np.asarray(logp) - np.asarray(mu)) / np.maximum(np.asarray(sigma), 1e-12)
    return lowest_mean(z, fraction)


def mia_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of telling members from non-members by score (members labelled 1)."""
    from sklearn.metrics import roc_auc_score

    if not member_scores or not nonmember_scores:
        raise UndoError("membership inference needs members and non-members (forget and unseen sequences)")
    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, list(member_scores) + list(nonmember_scores)))


def mia_scores(stats: TokenStats, seq: Encoded, text: str, fraction: float) -> dict[str, float]:
    """The four attacks' scores of one sequence over its scored positions."""
    pos = list(range(seq.first, len(seq.ids)))
    logp, mu, sigma = stats.logp[pos], stats.mu[pos], stats.sigma[pos]
    return {"loss": loss_score(logp), "zlib": zlib_score(logp, text), "mink": min_k_score(logp, fraction),
            "minkpp": min_k_plus_plus_score(logp, mu, sigma, fraction)}


def privleak(auc_model: float, auc_oracle: float) -> float:
    """MUSE's PrivLeak: (AUC_model - AUC_oracle) / AUC_oracle; 0 is the oracle's level."""
    if auc_oracle <= 0:
        raise UndoError(f"PrivLeak needs the oracle's AUC > 0, got {auc_oracle}")
    return (auc_model - auc_oracle) / auc_oracle


MIA_ATTACKS = ("loss", "zlib", "mink", "minkpp")


def privleak_metrics(metrics: dict[str, float], oracle_metrics: dict[str, float]) -> dict[str, float]:
    """`privleak_<attack>` for each attack whose `mia_<attack>_auc` both a model's metrics and
    the oracle's hold (the report's join of a model's row with the oracle's)."""
    return {f"privleak_{a}": privleak(metrics[f"mia_{a}_auc"], oracle_metrics[f"mia_{a}_auc"])
            for a in MIA_ATTACKS if f"mia_{a}_auc" in metrics and f"mia_{a}_auc" in oracle_metrics}


def perplexity(nll_sum: float, tokens: float) -> float:
    """exp(total NLL / scored tokens)."""
    if tokens <= 0:
        return float("nan")
    return math.exp(min(nll_sum / tokens, 700.0))
