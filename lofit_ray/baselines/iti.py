"""Inference-Time Intervention (Li et al., NeurIPS 2023) as a LoFiT-compatible adapter.

ITI in four steps, each a function here:

1. `head_activations`: the output of every attention head (the input of o_proj, the same
   place LoFiT acts) at the last token of each labelled statement, [N, layers, heads, head_dim].
2. `probe_heads`: one logistic-regression probe per head, all heads trained at once as a
   batched linear model; heads are ranked by held-out accuracy (a `HeadSet`, method "iti").
3. `iti_directions`: for the top-K heads, the mass-mean shift (mean of true minus mean of
   false activations), normalised, and sigma = the std of the activations projected on it.
4. `fit_iti`: the offset v = alpha * sigma * direction on each selected head, written as an
   `Adapter` (method "iti") so it attaches, saves, merges and exports like a LoFiT adapter;
   alpha is chosen on a selection split with `lofit_ray.evaluate.evaluate`.

Differences from the reference implementation (github.com/likenneth/honest_llama), on purpose:
  * the offset is added at every token position (LoFiT's offsets machinery), where ITI adds
    it from the answer on (MC scoring) or at the last token (generation);
  * the probe is an L2-regularised logistic regression (sklearn's default C=1 objective) fit
    by L-BFGS in torch on per-head standardised features, not sklearn on raw features.
    Standardising changes only the conditioning and the meaning of C, not which heads
    carry a linearly decodable signal;
  * probe train/validation split is by item (all statements of one question on one side),
    inferred from label order when the caller gives no groups (see `item_groups`).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict

import torch

from ..adapter import Adapter
from ..config import ItiConfig
from ..evaluate import selection_score
from ..architectures import o_projs
from ..heads import HeadSet
from ..offsets import HeadOffsets

# ITI's paper uses alpha=15 with K=48 heads of LLaMA-7B. Small models with K at 3-10% of
# their heads need a wider range; the grid is ascending so ties go to the smaller alpha.
DEFAULT_ALPHAS = tuple(ItiConfig().alphas)  # the defaults live in config.ItiConfig


# --- 1. activations ---------------------------------------------------------------------------

def head_activations(loaded, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None,
                     progress: bool = False) -> torch.Tensor:
    """Head outputs (o_proj inputs) at the last token of each text: float32 [N, layers, heads, head_dim].

    One forward pass of the decoder per batch, a forward pre-hook on every o_proj. Texts are
    right-padded, so each text's last token is at index length-1. Texts are batched in order of
    length (less padding) and returned in the given order. `max_length` keeps the end of a long
    text (the last token is what is read).
    """
    if not texts:
        raise ValueError("no texts to read activations from")
    tok, model = loaded.tokenizer, loaded.model
    layout = loaded.layout
    L, H, D = layout.num_layers, layout.num_heads, layout.head_dim
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    if max_length:
        ids = [x[-max_length:] for x in ids]
    if any(len(x) == 0 for x in ids):
        raise ValueError("a text tokenizes to nothing; every statement needs at least one token")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), L, H, D)
    captured: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}  # "last": [B] index of each row's last real token, set per batch

    def make_hook(layer: int):
        def hook(module, args):
            x = args[0]
            rows = torch.arange(x.shape[0], device=x.device)
            captured[layer] = x[rows, state["last"].to(x.device)].detach().float().unflatten(-1, (H, D)).cpu()
        return hook

    handles = [proj.register_forward_pre_hook(make_hook(layer)) for layer, proj in enumerate(o_projs(model))]
    chunks = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc="head activations", unit="batch")
    try:
        with torch.no_grad():
            for start in chunks:
                idx = order[start: start + batch_size]
                lengths = torch.tensor([len(ids[i]) for i in idx])
                width = int(lengths.max())
                input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                state["last"] = lengths - 1
                captured.clear()
                model.get_decoder()(input_ids=input_ids.to(device), attention_mask=mask.to(device))
                out[torch.tensor(idx)] = torch.stack([captured[layer] for layer in range(L)], dim=1)
    finally:
        for handle in handles:
            handle.remove()
    return out


# --- 2. probes --------------------------------------------------------------------------------

def item_groups(labels: Sequence[int]) -> list[int]:
    """Group ids for statements listed item by item with true ones first (every task's
    `labelled_statements` does so): a new item starts where a true label follows a false one.

    Two consecutive items can merge into one group (e.g. an item with no false statement),
    which only makes the split coarser; it never puts one item on both sides.
    """
    groups, g = [], 0
    for i, y in enumerate(labels):
        if i and int(y) == 1 and int(labels[i - 1]) == 0:
            g += 1
        groups.append(g)
    return groups


def split_indices(n: int, val_fraction: float, seed: int, groups: Sequence[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) index tensors; whole groups go to one side when there are at least two groups."""
    if n < 2:
        raise ValueError(f"probing needs at least 2 labelled statements, got {n}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
    gen = torch.Generator().manual_seed(seed)
    want = max(1, round(val_fraction * n))
    if groups is not None and len(set(groups)) >= 2:
        if len(groups) != n:
            raise ValueError(f"{len(groups)} group ids for {n} statements")
        members: dict = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        keys = list(members)
        val = []
        for j in torch.randperm(len(keys), generator=gen).tolist():
            if len(val) >= want:
                break
            if len(val) + len(members[keys[j]]) >= n:  # keep at least one training statement
                continue
            val += members[keys[j]]
        if val:
            is_val = torch.zeros(n, dtype=torch.bool)
            is_val[val] = True
            return (~is_val).nonzero()[:, 0], is_val.nonzero()[:, 0]
    perm = torch.randperm(n, generator=gen)
    want = min(want, n - 1)
    return perm[want:].sort().values, perm[:want].sort().values


def fit_probes(x: torch.Tensor, y: torch.Tensor, c: float = 1.0, steps: int = 200
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logistic regression for G independent probes at once.

    x: [G, N, D] features, y: [N] labels in {0, 1}. Minimises, for each probe,
    mean log-loss + ||w||^2 / (2 C N) (sklearn's objective divided by C N) on features
    standardised per probe and dimension. The probes share no parameters, so one L-BFGS
    run over the sum of their objectives fits them all. Returns (w [G, D], b [G], mean [G, D], std [G, D]).
    """
    G, N, D = x.shape
    x = x.double()
    mean, std = x.mean(1), x.std(1, unbiased=False).clamp(min=1e-8)
    xs = (x - mean[:, None]) / std[:, None]
    yd = y.double().expand(G, N)
    w = torch.zeros(G, D, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(G, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")
    reg = 1.0 / (2.0 * c * N)

    def closure():
        opt.zero_grad()
        logits = torch.einsum("gnd,gd->gn", xs, w) + b[:, None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yd, reduction="none").mean(1)
        total = (loss + reg * (w * w).sum(1)).sum()
        total.backward()
        return total

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


def probe_heads(acts: torch.Tensor, labels: Sequence[int], val_fraction: float = 0.2, seed: int = 0,
                groups: Sequence[int] | None = None, c: float = 1.0, steps: int = 200) -> dict:
    """Train a probe on every head and rank heads by held-out accuracy.

    acts: [N, layers, heads, head_dim]; labels: N values in {0, 1}; groups: an item id per
    statement (default: `item_groups(labels)`), so no item is on both sides of the split.
    Returns {"ranking": [[layer, head, val_accuracy], ...] best first (ties broken by lower
    held-out log-loss), "accuracy": [layers, heads], "train_accuracy", "val_loss", "n_train", "n_val"}.
    """
    N, L, H, D = acts.shape
    y = torch.as_tensor(list(labels), dtype=torch.float64)
    if y.numel() != N:
        raise ValueError(f"{y.numel()} labels for {N} activations")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("labels must be 0 or 1")
    if y.min() == y.max():
        raise ValueError("probing needs both true and false statements; all labels are equal")
    groups = item_groups(y.long().tolist()) if groups is None else list(groups)
    train, val = split_indices(N, val_fraction, seed, groups)
    x = acts.reshape(N, L * H, D).transpose(0, 1)  # [G, N, D]
    w, b, mean, std = fit_probes(x[:, train], y[train], c=c, steps=steps)

    def score(idx):
        xs = (x[:, idx].double() - mean[:, None]) / std[:, None]
        logits = torch.einsum("gnd,gd->gn", xs, w) + b[:, None]
        target = y[idx].expand_as(logits)
        acc = ((logits > 0).double() == target).double().mean(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
        return acc, loss

    val_acc, val_loss = score(val)
    train_acc, _ = score(train)
    order = sorted(range(L * H), key=lambda g: (-float(val_acc[g]), float(val_loss[g]), g))
    return {
        "ranking": [[g // H, g % H, float(val_acc[g])] for g in order],
        "accuracy": val_acc.float().reshape(L, H),
        "train_accuracy": train_acc.float().reshape(L, H),
        "val_loss": val_loss.float().reshape(L, H),
        "n_train": int(train.numel()),
        "n_val": int(val.numel()),
    }


# --- 3. directions ----------------------------------------------------------------------------

def iti_directions(acts: torch.Tensor, labels: Sequence[int], heads: Sequence[tuple[int, int]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass-mean-shift directions for `heads`: (unit directions [K, head_dim], sigma [K]).

    direction = mean(true activations) - mean(false activations), normalised; sigma = the
    (population) std over all statements of the activations projected on it, as ITI does.
    A head whose two means coincide gets a zero direction (and so no offset).
    """
    y = torch.as_tensor(list(labels), dtype=torch.bool)
    idx = torch.tensor([list(h) for h in heads], dtype=torch.long)
    z = acts[:, idx[:, 0], idx[:, 1]].double()  # [N, K, D]
    shift = z[y].mean(0) - z[~y].mean(0)
    norm = shift.norm(dim=-1, keepdim=True)
    unit = torch.where(norm > 0, shift / norm.clamp(min=1e-30), torch.zeros_like(shift))
    sigma = torch.einsum("nkd,kd->nk", z, unit).std(0, unbiased=False)
    return unit.float(), sigma.float()


# --- 4. the adapter ---------------------------------------------------------------------------

def iti_adapter(loaded, heads: Sequence[tuple[int, int]], directions: torch.Tensor, sigma: torch.Tensor,
                alpha: float, *, task: str = "", head_set: HeadSet | None = None, hparams: dict | None = None
                ) -> Adapter:
    """An Adapter whose offset on head i is alpha * sigma[i] * directions[i]."""
    offsets = HeadOffsets(loaded.layout, offset_heads=[tuple(h) for h in heads])
    with torch.no_grad():
        offsets.offset.copy_(alpha * sigma[:, None] * directions)
    return Adapter.from_offsets(offsets, loaded, task=task, head_set=head_set, method="iti",
                                hparams={"alpha": float(alpha), **(hparams or {})})


def fit_iti(loaded, task, k: int, *, selection_items=None, alphas: Sequence[float] = DEFAULT_ALPHAS,
            statements: Sequence[tuple[str, int]] | None = None, limit: int | None = None, probe_path=None,
            batch_size: int = 8, max_length: int | None = None, val_fraction: float = 0.2, seed: int = 0,
            score_base: bool = True, progress: bool = False) -> tuple[Adapter, dict]:
    """ITI at K heads: probe every head, intervene on the top K, pick alpha on `selection_items`.

    task: a Task (its `labelled_statements(probe_path, limit=limit)` give the probing data
    unless `statements` is given) or just a name when `statements` is given.
    selection_items: evaluation items (e.g. task.eval_items("val")) scored with
    `lofit_ray.evaluate.evaluate` for every alpha; the best `selection_score` wins (first
    in grid order on ties). Without them, alphas must hold exactly one value.
    Returns (adapter, info): info has the alpha grid's metrics, the base model's metrics
    (score_base), the full probe `head_set`, probe accuracies of the chosen heads, and the
    unit `directions` [K, head_dim] and `sigma` [K] (tensors) so the offsets can be rescaled.
    """
    from ..evaluate import evaluate

    start = time.time()
    layout = loaded.layout
    if not 0 < k <= layout.total_heads:
        raise ValueError(f"K={k} is out of range: the model has {layout.total_heads} heads "
                         f"({layout.num_layers} layers x {layout.num_heads}); choose K in 1..{layout.total_heads}")
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty; give at least one intervention strength")
    if selection_items is None and len(alphas) > 1:
        raise ValueError(f"choosing among {len(alphas)} alphas needs selection_items (e.g. task.eval_items('val'))")
    task_name = task if isinstance(task, str) else task.name
    if statements is None:
        if isinstance(task, str):
            raise ValueError("pass a Task object (or statements=) so there is probing data")
        statements = task.labelled_statements(probe_path, limit=limit)
    texts = [t for t, _ in statements]
    labels = [int(y) for _, y in statements]

    acts = head_activations(loaded, texts, batch_size=batch_size, max_length=max_length, progress=progress)
    probes = probe_heads(acts, labels, val_fraction=val_fraction, seed=seed)
    head_set = HeadSet(model=loaded.spec, fingerprint=loaded.fingerprint, layout=asdict(layout),
                       ranking=probes["ranking"], k=k, method="iti", task=task_name, seed=seed,
                       hparams={"val_fraction": val_fraction, "n_statements": len(texts),
                                "n_probe_train": probes["n_train"], "n_probe_val": probes["n_val"],
                                "probe": "logistic regression, L2 C=1, standardised, L-BFGS"})
    heads = head_set.top(k)
    directions, sigma = iti_directions(acts, labels, heads)
    hparams = {"k": k, "n_statements": len(texts), "val_fraction": val_fraction, "seed": seed,
               "probe_accuracy": [float(probes["accuracy"][l, h]) for l, h in heads],
               "sigma": sigma.tolist()}

    grid, base, best = [], None, None
    if selection_items is not None:
        if score_base:
            base = evaluate(loaded, selection_items, batch_size=batch_size)
        for alpha in alphas:
            adapter = iti_adapter(loaded, heads, directions, sigma, alpha, task=task_name, head_set=head_set)
            offsets = adapter.attach(loaded.model)
            try:
                metrics = evaluate(loaded, selection_items, batch_size=batch_size)
            finally:
                offsets.detach()
            score = selection_score(metrics)
            grid.append({"alpha": alpha, "score": score, **metrics})
            if best is None or score > best[1]:
                best = (alpha, score)
            if progress:
                print(f"[iti] alpha={alpha:g}: score {score:.4f} {metrics}", flush=True)
    alpha = best[0] if best is not None else alphas[0]
    adapter = iti_adapter(loaded, heads, directions, sigma, alpha, task=task_name, head_set=head_set,
                          hparams={**hparams, "alpha_grid": grid, "base": base})
    info = {"alpha": alpha, "alpha_grid": grid, "base": base, "head_set": head_set, "heads": heads,
            "probe_accuracy": hparams["probe_accuracy"], "probe_accuracy_grid": probes["accuracy"],
            "directions": directions, "sigma": sigma, "n_statements": len(texts),
            "seconds": round(time.time() - start, 2)}
    return adapter, info
