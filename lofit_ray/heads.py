"""Head sets: a ranked list of (layer, head, score) plus where it came from.

A head set is the product of phase 1 (or of a baseline such as random heads or
ITI probing). Phase 2 takes its top K. It is a small JSON document so a person
can read it, diff it, and compare sets across runs, tasks and models.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .architectures import HeadLayout


@dataclass
class HeadSet:
    model: str  # the model spec it was computed on, e.g. "smollm2-135m"
    fingerprint: str  # models.fingerprint(): changes when the weights or config change
    layout: dict  # HeadLayout fields
    ranking: list[list]  # [[layer, head, score], ...], best first, every head of the model or the top ones
    k: int  # how many heads phase 2 takes by default
    method: str = "lofit"  # lofit | random | iti | transfer
    task: str = ""
    hparams: dict = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        total = self.layout["num_layers"] * self.layout["num_heads"]
        if not 0 < self.k <= total:
            raise ValueError(
                f"k={self.k} is out of range: this model has {total} heads "
                f"({self.layout['num_layers']} layers x {self.layout['num_heads']} heads); choose 1..{total}"
            )
        if self.k > len(self.ranking):
            raise ValueError(f"k={self.k} but the ranking lists only {len(self.ranking)} heads")

    def top(self, k: int | None = None) -> list[tuple[int, int]]:
        k = self.k if k is None else k
        total = self.layout["num_layers"] * self.layout["num_heads"]
        if not 0 < k <= min(total, len(self.ranking)):
            raise ValueError(f"K={k} is larger than the {min(total, len(self.ranking))} heads available; lower K")
        return [(int(l), int(h)) for l, h, _ in self.ranking[:k]]

    def with_k(self, k: int) -> "HeadSet":
        self.top(k)
        return HeadSet(**{**asdict(self), "k": k})

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(asdict(self), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "HeadSet":
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            if not path.is_file():
                raise FileNotFoundError(f"head set file not found: {path}; pass the JSON written by `lofit-ray select`")
            text = path.read_text()
        return cls(**json.loads(text))

    def score_grid(self) -> torch.Tensor:
        """[layers, heads] scores (NaN where the ranking does not list a head), for heatmaps."""
        grid = torch.full((self.layout["num_layers"], self.layout["num_heads"]), float("nan"))
        for layer, head, score in self.ranking:
            grid[layer, head] = score
        return grid


def rank_by_norm(scale: torch.Tensor) -> list[list]:
    """Rank every head by the L2 norm of its learned scale A[layer, head, :], largest first."""
    norms = scale.detach().float().norm(dim=-1)
    order = torch.argsort(norms.flatten(), descending=True)
    H = norms.shape[1]
    return [[int(i) // H, int(i) % H, float(norms.flatten()[i])] for i in order]


def random_ranking(layout: HeadLayout, seed: int) -> list[list]:
    heads = [[l, h, 0.0] for l in range(layout.num_layers) for h in range(layout.num_heads)]
    random.Random(seed).shuffle(heads)
    return heads


def jaccard(a: HeadSet, b: HeadSet, k: int | None = None) -> float:
    sa, sb = set(a.top(k)), set(b.top(k))
    return len(sa & sb) / len(sa | sb)


def per_layer_counts(head_set: HeadSet, k: int | None = None) -> list[int]:
    counts = Counter(layer for layer, _ in head_set.top(k))
    return [counts.get(l, 0) for l in range(head_set.layout["num_layers"])]


def compare(sets: dict[str, HeadSet], k: int | None = None) -> dict:
    """Pairwise overlap and Jaccard of the top-K heads, and per-layer histograms.

    Sets from different models compare only when their layouts have the same shape.
    """
    names = list(sets)
    shapes = {(s.layout["num_layers"], s.layout["num_heads"]) for s in sets.values()}
    if len(shapes) > 1:
        raise ValueError(f"head sets have different shapes {sorted(shapes)}; only sets of equal layers x heads compare")
    pairs = []
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            sx, sy = set(sets[x].top(k)), set(sets[y].top(k))
            pairs.append({"a": x, "b": y, "overlap": len(sx & sy), "jaccard": len(sx & sy) / len(sx | sy)})
    return {"pairs": pairs, "per_layer": {n: per_layer_counts(s, k) for n, s in sets.items()}}
