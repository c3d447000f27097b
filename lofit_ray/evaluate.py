"""Scoring: multiple choice by summed answer log-probs (MC1/MC2), generation by exact match.

MC items of one task share a long prompt (TruthfulQA: instruction + 6-shot primer).
Its key/value cache is computed once; then each question runs as one packed row,
its own tokens followed by all its choices, so no token is computed twice
(jobs/bench_core.py measures this against the FLOP floor). Generation stops each
prompt as soon as its exact-match score is settled.
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import batching, losses
from .evidence import metric_columns


def _common_prefix(token_lists: list[list[int]]) -> int:
    first = token_lists[0]
    n = min(len(t) for t in token_lists) - 1  # leave every item at least one token of its own
    for i in range(max(n, 0)):
        if any(t[i] != first[i] for t in token_lists):
            return i
    return max(n, 0)


def _repeat_rows(cache, n: int):
    """A new cache holding `n` copies of `cache`'s single row; `cache` stays valid (its layers rebind
    their tensors on repeat and on append, never write into them)."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.batch_repeat_interleave(n)
    return out


@dataclass
class _Packed:
    """One question as one row: its own tokens, then every choice, each choice seeing only the question."""

    ids: list[int]
    positions: list[int]  # position ids: every choice restarts right after the question
    segment: list[int]  # -1: the question's own tokens, c: choice c
    targets: list[tuple[int, int, int]]  # (choice, state index, token id): state index predicts token id


def _pack(own: list[int], choices: list[list[int]], start: int) -> _Packed:
    ids, positions, segment, targets = list(own), [start + t for t in range(len(own))], [-1] * len(own), []
    for c, tokens in enumerate(choices):
        before = len(own) - 1  # the question's last state predicts the choice's first token
        for j, token in enumerate(tokens):
            targets.append((c, before, token))
            before = len(ids)
            ids.append(token)
            positions.append(start + len(own) + j)
            segment.append(c)
    return _Packed(ids, positions, segment, targets)


def _packed_mask(packed: list[_Packed], shared: int, width: int, config, dtype) -> torch.Tensor | dict:
    """The attention mask of packed question rows after a `shared`-token prefix: each row one span whose
    trunk is the question and whose branches are its choices (batching.tree_attention_mask)."""
    segment = torch.full((len(packed), width), -2)
    positions = torch.zeros((len(packed), width), dtype=torch.long)
    for r, p in enumerate(packed):
        segment[r, : len(p.ids)] = torch.tensor(p.segment)
        positions[r, : len(p.ids)] = torch.tensor(p.positions)
    group = torch.where(segment >= -1, 0, -1)
    return batching.tree_attention_mask(group, segment, positions, config, dtype, prefix=shared)


def mc_scores(loaded, items, share_prefix: bool = True, progress: bool = False,
              tokens_per_batch: int = 1024) -> list[list[float]]:
    """Summed log-prob of each choice's tokens after its item's prefix: one list per item.

    Every token runs once: the prefix all items share (TruthfulQA's instruction + 6-shot primer) once
    per call, then each question as one packed row, its own tokens followed by all its choices, with a
    mask that lets each choice see the prefix, the question and itself, and positions that restart
    after the question for every choice. Rows of similar length are batched up to `tokens_per_batch`.
    """
    tok, model = loaded.tokenizer, loaded.model
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pad = tok.pad_token_id or 0
    prefixes = [tok(item.prefix, add_special_tokens=True)["input_ids"] for item in items]
    shared = _common_prefix(prefixes) if share_prefix and len(items) > 1 else 0
    if shared >= (batching.sliding_window(model.config) or shared + 1):
        shared = 0  # a sliding-window cache would keep only the prefix's last tokens: run it with each row
    packed = [_pack(prefix[shared:], [tok(c, add_special_tokens=False)["input_ids"] for c in item.choices], shared)
              for prefix, item in zip(prefixes, items)]
    groups = batching.by_token_budget([len(p.ids) for p in packed], tokens_per_batch)
    if progress:
        from tqdm import tqdm
        groups = tqdm(groups, desc="MC scoring", unit="batch")
    scores: list = [None] * len(items)
    with torch.no_grad():
        shared_cache = None
        if shared:
            shared_cache = decoder(input_ids=torch.tensor([prefixes[0][:shared]], device=device), use_cache=True).cache
        for group in groups:
            rows = [packed[i] for i in group]
            width = max(len(p.ids) for p in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            positions = torch.zeros((len(rows), width), dtype=torch.long)
            for r, p in enumerate(rows):
                ids[r, : len(p.ids)] = torch.tensor(p.ids)
                positions[r, : len(p.ids)] = torch.tensor(p.positions)
            mask = _packed_mask(rows, shared, width, model.config, dtype)
            mask = {k: m.to(device) for k, m in mask.items()} if isinstance(mask, dict) else mask.to(device)
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask, position_ids=positions.to(device),
                             cache=_repeat_rows(shared_cache, len(rows)) if shared_cache else None,
                             use_cache=shared_cache is not None).last_hidden_state
            where = [(r, c, state, token) for r, p in enumerate(rows) for c, state, token in p.targets]
            r_idx, c_idx, s_idx, targets = (torch.tensor(x, dtype=torch.long) for x in zip(*where))
            logp = losses.token_logprobs(model, hidden[r_idx.to(device), s_idx.to(device)], targets.to(device))
            for r, i in enumerate(group):
                per_choice = torch.zeros(len(items[i].choices)).index_add(
                    0, c_idx[r_idx == r], logp.float().cpu()[r_idx == r])
                scores[i] = per_choice.tolist()
    return scores


def mc_item_metrics(item, scores: list[float]) -> tuple[float, float]:
    """(MC1, MC2) of one question. MC1: the best answer outscores every incorrect one.
    MC2: the probability mass on correct answers."""
    wrong = [x for x, lab in zip(scores, item.labels) if not lab]
    mc1 = float(scores[item.best_index()] > max(wrong)) if wrong else 1.0
    top = max(scores)
    mass = [math.exp(x - top) for x in scores]
    return mc1, sum(m for m, lab in zip(mass, item.labels) if lab) / sum(mass)


def mc_metrics(items, scores: list[list[float]]) -> dict:
    """MC1 and MC2 averaged over questions."""
    per_item = [mc_item_metrics(item, s) for item, s in zip(items, scores)]
    return {"mc1": sum(m1 for m1, _ in per_item) / len(items), "mc2": sum(m2 for _, m2 in per_item) / len(items)}


def answer_logprobs(loaded, items) -> list[float]:
    """Mean log-prob per token of each generation item's reference answer after its prompt: a continuous
    score of the same skill exact match counts, with far less noise on a small split."""
    from .tasks.base import MCQuestion

    tok = loaded.tokenizer
    refs = [item.reference or item.answers[0] for item in items]
    as_mc = [MCQuestion(question=item.prompt, choices=[ref], labels=[1], prefix=item.prompt)
             for item, ref in zip(items, refs)]
    sums = mc_scores(loaded, as_mc)
    return [s[0] / max(len(tok(ref, add_special_tokens=False)["input_ids"]), 1) for s, ref in zip(sums, refs)]


def generate(loaded, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
             settled: Callable[[int, str], bool] | None = None) -> list[str]:
    """Greedy generations, left-padded batches of similar prompt length; returns only the new text.

    settled(i, text_so_far) -> True stops prompt i there (its score can no longer change); a batch
    ends when all its rows are settled, hit EOS or reach max_new_tokens.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(tok(prompts[i])["input_ids"]))
    side, tok.padding_side = tok.padding_side, "left"
    out: list[str] = [""] * len(prompts)

    class Settled(StoppingCriteria):
        def __init__(self, rows: list[int], width: int):
            self.rows, self.width = rows, width

        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            texts = tok.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
            return torch.tensor([settled(i, t) for i, t in zip(self.rows, texts)], device=input_ids.device)

    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start: start + batch_size]
                enc = tok([prompts[i] for i in rows], return_tensors="pt", padding=True).to(device)
                width = enc["input_ids"].shape[1]
                stop = StoppingCriteriaList([Settled(rows, width)]) if settled else None
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, stopping_criteria=stop,
                                     pad_token_id=tok.pad_token_id, top_p=None, top_k=None, temperature=None)
                for i, text in zip(rows, tok.batch_decode(gen[:, width:], skip_special_tokens=True)):
                    out[i] = text
    finally:
        tok.padding_side = side
    return out


def generate_items(loaded, items, batch_size: int = 8) -> list[str]:
    """Greedy generations of generation items, grouped by their max_new_tokens; each stops once its match
    against the item's answers is settled."""
    from .tasks import match_settled

    texts = [""] * len(items)
    for max_new in sorted({item.max_new_tokens for item in items}):
        idx = [i for i, item in enumerate(items) if item.max_new_tokens == max_new]
        generated = generate(loaded, [items[i].prompt for i in idx], max_new, batch_size,
                             settled=lambda j, text, idx=idx: match_settled(text, items[idx[j]]))
        for i, text in zip(idx, generated):
            texts[i] = text
    return texts


def item_id(index: int, item) -> str:
    """A per-item record's key: position and a hash of what is asked, so two evaluations pair up only
    when they scored the same items in the same order."""
    from .splits import asked

    return f"{index}-{hashlib.sha256(asked(item).encode()).hexdigest()[:10]}"


def evaluate_items(loaded, items, batch_size: int = 8, progress: bool = False) -> tuple[dict, list[dict]]:
    """(metrics, one row per item). Metrics are the means of the rows' metric columns, with n and wall
    time; rows carry what each item was scored on and its own MC1/MC2 or EM/lenient EM/answer log-prob."""
    from .tasks import match_item

    if not items:
        raise ValueError("no evaluation items: the evaluation split is empty")
    start = time.time()
    if hasattr(items[0], "choices"):
        scores = mc_scores(loaded, items, progress=progress)
        rows = []
        for i, (item, s) in enumerate(zip(items, scores)):
            mc1, mc2 = mc_item_metrics(item, s)
            rows.append({"id": item_id(i, item), "question": item.question, "choices": item.choices,
                         "labels": item.labels, "choice_logprobs": s, "mc1": mc1, "mc2": mc2})
    else:
        texts = generate_items(loaded, items, batch_size)
        logprobs = answer_logprobs(loaded, items)
        rows = []
        for i, (item, text, lp) in enumerate(zip(items, texts, logprobs)):
            strict, lenient = match_item(text, item)
            rows.append({"id": item_id(i, item), "prompt": item.prompt, "answers": item.answers, "generated": text,
                         "em": float(strict), "em_lenient": float(lenient), "answer_logprob": lp})
    metrics = {c: sum(r[c] for r in rows) / len(rows) for c in metric_columns(rows)}
    metrics.update(n=len(items), seconds=round(time.time() - start, 2))
    return metrics, rows


def evaluate(loaded, items, batch_size: int = 8, progress: bool = False) -> dict:
    """Metrics for a list of MCQuestion or GenerationItem, with n and wall time (evaluate_items keeps the rows)."""
    return evaluate_items(loaded, items, batch_size, progress)[0]


def selection_score(metrics: dict, metric: str = "auto") -> float:
    """The one number hyperparameters are chosen by, on the selection split (search, reproduce, ITI).

    "auto" (the default): MC2 for multiple choice, the reference answer's mean log-prob per token for
    generation; both are continuous, so a selection split of a few dozen items still ranks trials
    (MC1 and EM move in steps of 1/n). "score": mean of MC1 and MC2, or EM + 1e-3 x lenient EM.
    Any other name picks that metric alone.
    """
    if metric == "auto":
        return metrics["mc2"] if "mc2" in metrics else metrics["answer_logprob"]
    if metric != "score":
        return metrics[metric]
    if "mc1" in metrics:
        return (metrics["mc1"] + metrics["mc2"]) / 2
    return metrics["em"] + 1e-3 * metrics.get("em_lenient", 0.0)
