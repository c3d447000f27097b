"""Skip the frozen layers below the lowest trained head during phase 2 (offset training).

With offsets only in layers >= L, everything below L is a fixed function of the input.
So the hidden state entering layer L is computed once per sequence, and training steps
run only layers L.. (the decoder's layer list is swapped for its tail, and the cached
state goes in as `inputs_embeds`; every family in architectures.FAMILIES scales its
embeddings inside the embedding module, so the tail sees exactly what it saw before).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .architectures import _get, decoder_layers, family_of
from .batching import Batch, collate


@contextlib.contextmanager
def tail_only(model, start: int):
    """Temporarily make the decoder run layers[start:] only."""
    family = family_of(model.config)
    parent_path, _, name = family.layers.rpartition(".")
    parent = _get(model, parent_path)
    full = getattr(parent, name)
    setattr(parent, name, nn.ModuleList(list(full)[start:]))
    try:
        yield
    finally:
        setattr(parent, name, full)


class _Stop(Exception):
    """Raised inside the capture hook: nothing above layer `start` needs to run."""


def capture(model, seqs: list, start: int, pad_id: int, batch_size: int = 8) -> list[torch.Tensor]:
    """Hidden states entering layer `start`, one [len(seq), hidden] tensor per sequence."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    grabbed = {}

    def grab(module, args, kwargs):
        grabbed["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        raise _Stop

    handle = decoder_layers(model)[start].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, len(seqs), batch_size):
                part = seqs[i: i + batch_size]
                batch = collate(part, pad_id).to(device)
                try:
                    model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                except _Stop:
                    pass
                for row, s in enumerate(part):
                    out.append(grabbed["h"][row, : len(s.ids)].clone())
    finally:
        handle.remove()
    return out


def embeds_batch(batch: Batch, hidden: list[torch.Tensor]) -> torch.Tensor:
    """Place each sequence's cached hidden states where the batch holds its tokens: [R, T, hidden]."""
    R, T = batch.input_ids.shape
    embeds = hidden[0].new_zeros(R, T, hidden[0].shape[-1])
    for (row, start, length, skip), h in zip(batch.slots, hidden):
        embeds[row, start: start + length] = h[skip: skip + length]
    return embeds
