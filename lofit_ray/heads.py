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
    k: int | None = None  # the heads phase 2 takes; None: a ranking only, K is chosen at phase 2
    method: str = "lofit"  # lofit | random | iti | transfer
    task: str = ""
    hparams: dict = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        total = self.layout["num_layers"] * self.layout["num_heads"]
        if self.k is None:
            return
        if not 0 < self.k <= total:
            raise ValueError(
                f"k={self.k} is out of range: this model has {total} heads "
                f"({self.layout['num_layers']} layers x {self.layout['num_heads']} heads); choose 1..{total}"
            )
        if self.k > len(self.ranking):
            raise ValueError(f"k={self.k} but the ranking lists only {len(self.ranking)} heads")

    def top(self, k: int | None = None) -> list[tuple[int, int]]:
        k = self.k if k is None else k
        if k is None:
            raise ValueError("this head set is a ranking without K; give K (how many top heads to take)")
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


def plot_head_set(head_set: HeadSet, path: str | Path, k: int | None = None) -> Path:
    """Write a layers x heads heatmap of score_grid() with the top-K heads framed (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    import matplotlib
    import numpy as np

    k = head_set.k if k is None else k  # None: a ranking without K, nothing framed
    grid = head_set.score_grid().numpy()
    layers, heads = grid.shape
    fig = Figure(figsize=(min(14.0, 2.5 + 0.4 * heads), min(14.0, 1.8 + 0.3 * layers)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest",
                      origin="upper")
    fig.colorbar(image, ax=ax, label="score")
    top = head_set.top(k) if k else []
    for layer, head in top:
        ax.add_patch(Rectangle((head - 0.45, layer - 0.45), 0.9, 0.9, fill=False, edgecolor="red", linewidth=1.5))
    if k and k <= 40:
        for rank, (layer, head) in enumerate(top, 1):
            ax.annotate(str(rank), (head, layer), ha="center", va="center", fontsize=6, color="red",
                        fontweight="bold")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(0, layers, max(1, layers // 16)))
    shown = f"top K={k} of {layers * heads} heads (red, ranked)" if k else f"ranking of {layers * heads} heads"
    ax.set_title(f"{head_set.model} / {head_set.task or 'no task'} / {head_set.method}: {shown}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
