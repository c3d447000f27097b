"""LoFiT's two kinds of trainable tensors and the hooks that apply them.

Phase 1 learns a scale A [layers, heads, head_dim] over every head: z <- z * (1 + A).
Phase 2 learns an offset v [K, head_dim] for K selected heads only:  z <- z + v.
Both act on the input of each layer's attention output projection, one
vectorized op per layer (no per-head Python loops). Layers with nothing to
apply get no hook at all, so autograd never reaches below the lowest head that
has a trainable tensor.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from .architectures import HeadLayout, head_layout, o_projs

INIT_STD = 1e-3
_ATTACHED = "_lofit_attached_offsets"  # the HeadOffsets hooked onto a model, kept on the model itself


class HeadOffsets(nn.Module):
    """Holds A (optional) and v (optional) and knows how to hook them into a model.

    scale=True gives A over all heads; offset_heads=[(layer, head), ...] gives v for those heads.
    Parameters stay in fp32; they are cast to the activation dtype inside the hook.
    """

    def __init__(
        self,
        layout: HeadLayout,
        *,
        scale: bool = False,
        offset_heads: Sequence[tuple[int, int]] = (),
        init_std: float = INIT_STD,
        seed: int = 0,
    ):
        super().__init__()
        self.layout = layout
        L, H, D = layout.num_layers, layout.num_heads, layout.head_dim
        for layer, head in offset_heads:
            if not (0 <= layer < L and 0 <= head < H):
                raise ValueError(f"head ({layer}, {head}) is outside this model's {L} layers x {H} heads")
        if len(set(map(tuple, offset_heads))) != len(offset_heads):
            raise ValueError("offset_heads lists a head twice; a head set must name each head once")
        gen = torch.Generator().manual_seed(seed)
        self.scale = nn.Parameter(torch.randn(L, H, D, generator=gen) * init_std) if scale else None
        self.offset_heads = [tuple(map(int, h)) for h in offset_heads]
        self.offset = nn.Parameter(torch.randn(len(offset_heads), D, generator=gen) * init_std) if offset_heads else None
        # For each layer: which rows of `offset` go to which heads.
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for row, (layer, head) in enumerate(self.offset_heads):
            self._rows.setdefault(layer, ([], []))
            self._rows[layer][0].append(row)
            self._rows[layer][1].append(head)
        self._rows = {l: (torch.tensor(r), torch.tensor(h)) for l, (r, h) in self._rows.items()}
        self.enabled = True
        self._handles: list = []

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs) -> "HeadOffsets":
        return cls(head_layout(model.config), **kwargs)

    # -- which layers need a hook -------------------------------------------------
    def active_layers(self) -> list[int]:
        if self.scale is not None:
            return list(range(self.layout.num_layers))
        return sorted(self._rows)

    def lowest_layer(self) -> int:
        layers = self.active_layers()
        return layers[0] if layers else self.layout.num_layers

    # -- the op itself --------------------------------------------------------------
    def transform(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [..., heads*head_dim] head outputs of one layer -> the same with A and v applied."""
        H, D = self.layout.num_heads, self.layout.head_dim
        z = x.unflatten(-1, (H, D))
        if self.scale is not None:
            z = z * (1 + self.scale[layer].to(z.dtype))
        if layer in self._rows:
            rows, heads = self._rows[layer]
            delta = torch.zeros(H, D, dtype=z.dtype, device=z.device).index_copy(
                0, heads.to(z.device), self.offset[rows.to(self.offset.device)].to(z.dtype)
            )
            z = z + delta
        return z.flatten(-2)

    def full_offset(self) -> torch.Tensor:
        """v scattered to [layers, heads, head_dim], zeros where no head is selected."""
        L, H, D = self.layout.num_layers, self.layout.num_heads, self.layout.head_dim
        full = torch.zeros(L, H, D)
        if self.offset is not None:
            idx = torch.tensor(self.offset_heads)
            full[idx[:, 0], idx[:, 1]] = self.offset.detach().float().cpu()
        return full

    # -- hooking ----------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "HeadOffsets":
        """Register a forward pre-hook on the o_proj of every active layer (idempotent)."""
        self.detach()
        projs = o_projs(model)
        if len(projs) != self.layout.num_layers:
            raise ValueError(f"model has {len(projs)} layers but these offsets were built for {self.layout.num_layers}")
        device = next(model.parameters()).device
        self.to(device)
        for layer in self.active_layers():
            self._handles.append(projs[layer].register_forward_pre_hook(self._make_hook(layer)))
        model.__dict__.setdefault(_ATTACHED, []).append(self)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, layer: int):
        def hook(module, args):
            if not self.enabled:
                return None
            return (self.transform(layer, args[0]),) + tuple(args[1:])

        return hook

    def disabled(self):
        """Run the base model (e.g. the DPO reference pass) without removing the hooks."""
        return switched_off(self)


@contextlib.contextmanager
def switched_off(edit):
    """Inside the with-block, `edit`'s hooks stay in place but pass activations through (edit.enabled False)."""
    previous, edit.enabled = edit.enabled, False
    try:
        yield
    finally:
        edit.enabled = previous


def detach_all(model: nn.Module) -> None:
    """Take every HeadOffsets off a model, e.g. one a stopped trial left on a model kept for the next trial."""
    for offsets in model.__dict__.pop(_ATTACHED, []):
        offsets.detach()


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model
