"""Skip the frozen layers below the lowest trained head during phase 2 (offset training).

With offsets only in layers >= L, everything below L is a fixed function of the input.
So the hidden state entering layer L is computed once per sequence, and training steps
run only layers L.. (the decoder's layer list is swapped for its tail, and the cached
state goes in as `inputs_embeds`; the first tail layer is handed that tensor as its
hidden state, untouched by whatever the decoder does to embeddings, e.g. Granite's
embedding_multiplier, so the tail sees exactly what it saw before).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .architectures import decoder_layers, layers_parent
from .batching import Batch, collate


@contextlib.contextmanager
def tail_only(model, start: int):
    """Temporarily make the decoder run layers[start:] only, its first layer fed the `inputs_embeds` given."""
    parent, name = layers_parent(model)
    full = getattr(parent, name)
    given = {}

    def keep(module, args, kwargs):  # the decoder's inputs_embeds, before any scaling it applies
        given["h"] = kwargs.get("inputs_embeds")

    def feed(module, args, kwargs):
        if given.get("h") is None:
            return None
        if args:
            return (given["h"],) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": given["h"]}

    handles = [model.get_decoder().register_forward_pre_hook(keep, with_kwargs=True),
               full[start].register_forward_pre_hook(feed, with_kwargs=True)]
    setattr(parent, name, nn.ModuleList(list(full)[start:]))
    try:
        yield
    finally:
        setattr(parent, name, full)
        for handle in handles:
            handle.remove()


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
