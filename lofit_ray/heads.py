"""Head sets: a ranked list of (layer, head, score) plus where it came from.

A head set is the product of phase 1 (or of a baseline such as random heads or
ITI probing). Phase 2 takes its top K. It is a small JSON document so a person
can read it, diff it, and compare sets across runs, tasks and models.
"""
from __future__ import annotations

import json
import numbers
import random
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from .architectures import HeadLayout


class HeadSetError(ValueError):
    """A head set (or its JSON file) is malformed; the message names the file, the field and the fix."""


LAYOUT_FIELDS = ("model_type", "num_layers", "num_heads", "head_dim")
_FIX = "pass the file written by `lofit-ray select`"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _short(value) -> str:
    """repr() cut to one short line, for error messages about values read from a file."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_layout(layout) -> None:
    if not isinstance(layout, dict):
        raise HeadSetError(f"field 'layout': expected an object {{{', '.join(LAYOUT_FIELDS)}}}, "
                           f"got {type(layout).__name__}")
    for key in LAYOUT_FIELDS:
        if key not in layout:
            raise HeadSetError(f"field 'layout': missing {key!r}; a layout has {', '.join(LAYOUT_FIELDS)}")
    unknown = sorted(set(layout) - set(LAYOUT_FIELDS), key=str)
    if unknown:
        raise HeadSetError(f"field 'layout': unknown key {_short(unknown[0])}; a layout has "
                           f"{', '.join(LAYOUT_FIELDS)}")
    if not isinstance(layout["model_type"], str):
        raise HeadSetError(f"field 'layout': 'model_type' must be a string, got {_short(layout['model_type'])}")
    for key in LAYOUT_FIELDS[1:]:
        if not _is_int(layout[key]) or layout[key] < 1:
            raise HeadSetError(f"field 'layout': {key!r} must be a positive integer, got {_short(layout[key])}")


def _check_ranking(ranking, layers: int, heads: int) -> None:
    if not isinstance(ranking, list) or not ranking:
        got = "an empty list" if isinstance(ranking, list) else type(ranking).__name__
        raise HeadSetError(f"field 'ranking': expected a non-empty list of [layer, head, score] rows, got {got}")
    seen = set()
    for i, row in enumerate(ranking):
        if not (isinstance(row, (list, tuple)) and len(row) == 3 and _is_int(row[0]) and _is_int(row[1])
                and _is_number(row[2])):
            raise HeadSetError(f"field 'ranking': row {i} is {_short(row)}; each row is [layer, head, score] "
                               f"(two integers and a number)")
        layer, head = row[0], row[1]
        if not (0 <= layer < layers and 0 <= head < heads):
            raise HeadSetError(f"field 'ranking': row {i} names head (layer {layer}, head {head}), outside the "
                               f"layout of {layers} layers x {heads} heads")
        if (layer, head) in seen:
            raise HeadSetError(f"field 'ranking': row {i} lists head (layer {layer}, head {head}) a second time; "
                               f"each head is ranked once")
        seen.add((layer, head))


@dataclass
class HeadSet:
    model: str  # the model spec it was computed on, e.g. "smollm2-135m"
    fingerprint: str  # models.fingerprint(): changes when the weights or config change
    layout: dict  # HeadLayout fields
    ranking: list[list]  # [[layer, head, score], ...], best first, every head of the model or the top ones
    k: int | None = None  # the heads phase 2 takes; None: a ranking only, K is chosen at phase 2
    method: str = "lofit"  # lofit (the l1 selector) | gates | grad | grad_x_act | random | iti | transfer
    task: str = ""
    hparams: dict = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        """Check every field, so a malformed head set fails here with HeadSetError naming the field."""
        for name in ("model", "fingerprint", "method", "task"):
            if not isinstance(getattr(self, name), str):
                raise HeadSetError(f"field {name!r}: expected a string, got {_short(getattr(self, name))}")
        if not isinstance(self.hparams, dict):
            raise HeadSetError(f"field 'hparams': expected an object, got {type(self.hparams).__name__}")
        if not _is_int(self.seed):
            raise HeadSetError(f"field 'seed': expected an integer, got {_short(self.seed)}")
        _check_layout(self.layout)
        layers, heads = self.layout["num_layers"], self.layout["num_heads"]
        _check_ranking(self.ranking, layers, heads)
        total = layers * heads
        if self.k is None:
            return
        if not _is_int(self.k):
            raise HeadSetError(f"field 'k': expected an integer or null, got {_short(self.k)}")
        if not 0 < self.k <= total:
            raise HeadSetError(
                f"field 'k': k={self.k} is out of range: this model has {total} heads "
                f"({layers} layers x {heads} heads); choose 1..{total}"
            )
        if self.k > len(self.ranking):
            raise HeadSetError(f"field 'k': k={self.k} but the ranking lists only {len(self.ranking)} heads")

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
        """A head set from its JSON file (or the JSON text itself).

        Raises FileNotFoundError for a missing file and HeadSetError (a ValueError) naming the file and
        the field for anything else: bad JSON, unknown, missing or wrongly typed fields, bad ranking rows.
        """
        text = str(path_or_text)
        where = "head set JSON"
        if not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            if not path.is_file():
                raise FileNotFoundError(f"head set file not found: {path}; {_FIX}")
            where = str(path)
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise HeadSetError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}); {_FIX}") from None
            except OSError as exc:
                raise HeadSetError(f"{where}: cannot read it ({exc.strerror or exc}); {_FIX}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HeadSetError(f"{where}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; "
                               f"{_FIX}") from None
        except (ValueError, RecursionError) as exc:  # a number of 5000 digits, arrays nested 1000 deep
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
            raise HeadSetError(f"{where}: not valid JSON: {reason}; {_FIX}") from None
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data, where: str = "head set") -> "HeadSet":
        """A head set from parsed JSON; errors are HeadSetError "<where>: field '<name>': ..."."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict):
            raise HeadSetError(f"{where}: expected a JSON object with fields {', '.join(names)}, got "
                               f"{type(data).__name__}; {_FIX}")
        unknown = sorted(set(data) - set(names), key=str)
        if unknown:
            raise HeadSetError(f"{where}: field {_short(unknown[0])}: unknown; a head set has {', '.join(names)}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise HeadSetError(f"{where}: field {missing[0]!r}: missing; {_FIX}")
        try:
            return cls(**data)
        except HeadSetError as exc:
            raise HeadSetError(f"{where}: {exc}") from None

    def score_grid(self) -> torch.Tensor:
        """[layers, heads] scores (NaN where the ranking does not list a head), for heatmaps."""
        grid = torch.full((self.layout["num_layers"], self.layout["num_heads"]), float("nan"))
        for layer, head, score in self.ranking:
            grid[layer, head] = score
        return grid


def rank_by_score(scores: torch.Tensor) -> list[list]:
    """Rank every head by its score [layers, heads], largest first (ties in layer, head order)."""
    flat = scores.detach().float().flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    H = scores.shape[1]
    return [[int(i) // H, int(i) % H, float(flat[i])] for i in order]


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
