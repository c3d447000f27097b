"""The paper-style implementations the library is timed against, written plainly so each lever of the library
(lofit_ray.offsets' one-op hook, losses' answer-only LM head, evaluate's packed scorer) has its baseline.
They compute the same values as the library, up to float error; the benchmarks check that."""
from __future__ import annotations

import copy

import torch

from .. import losses
from ..architectures import o_projs
from ..batching import Batch, Sequence, collate, tree_attention_mask
from ..offsets import HeadOffsets


def per_head_loop_hooks(model, scale: torch.Tensor, head_dim: int) -> list:
    """Phase 1 the paper's way: on every layer's o_proj input, a Python loop over heads writing each head's
    slice scaled by (1 + A). Returns the hook handles."""
    def make(layer):
        def hook(module, args):
            x = args[0]
            out = x.clone()
            for h in range(scale.shape[1]):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                out[..., cols] = x[..., cols] * (1 + scale[layer, h]).to(x.dtype)
            return (out,) + tuple(args[1:])
        return hook
    return [proj.register_forward_pre_hook(make(layer)) for layer, proj in enumerate(o_projs(model))]


class LoopOffsets:
    """Phase 2 the paper's way: on EVERY layer's o_proj, clone the input and loop over EVERY head in Python,
    out[..., head] = x[..., head] + v[layer, head]. v is the trainable HeadOffsets.offset row on selected heads and
    a frozen zero elsewhere (the paper's code keeps a v per head), so it trains exactly what the library trains."""

    def __init__(self, offsets: HeadOffsets):
        self.offsets = offsets
        self.layout = offsets.layout
        self.rows = {head: row for row, head in enumerate(offsets.offset_heads)}
        self.enabled = True
        self._handles: list = []

    def attach(self, model) -> "LoopOffsets":
        H, D = self.layout.num_heads, self.layout.head_dim
        zero = torch.zeros(D)
        for layer, proj in enumerate(o_projs(model)):
            def hook(module, args, layer=layer):
                if not self.enabled:
                    return None
                x = args[0]
                out = x.clone()
                for h in range(H):
                    sl = slice(h * D, (h + 1) * D)
                    row = self.rows.get((layer, h))
                    v = self.offsets.offset[row] if row is not None else zero
                    out[..., sl] = x[..., sl] + v.to(x.dtype)
                return (out,) + tuple(args[1:])
            self._handles.append(proj.register_forward_pre_hook(hook))
        return self

    detach = HeadOffsets.detach  # both only need self._handles / self.enabled
    disabled = HeadOffsets.disabled


def full_vocab_logprobs(model, batch: Batch, inputs_embeds=None) -> torch.Tensor:
    """Logits at every position over the whole vocabulary, log_softmax over [B, T, V], then gather the answer
    tokens: the value of losses.answer_logprobs (which runs the LM head at answer positions only).
    use_cache=False and the same mask as answer_logprobs, so only the logits differ."""
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": batch.input_ids}
    mask = batch.attention_mask
    if batch.group is not None:
        dtype = inputs_embeds.dtype if inputs_embeds is not None else next(model.parameters()).dtype
        mask = tree_attention_mask(batch.group, batch.branch, batch.position_ids, model.config, dtype)
    logits = model(**inputs, attention_mask=mask, position_ids=batch.position_ids, use_cache=False).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    rows, states, cols = batch.answer_positions()
    token_logp = logp[rows, states, batch.input_ids[rows, cols]]
    return token_logp.new_zeros(batch.num_sequences).index_add(0, batch.sequence[rows, cols], token_logp)


def per_question_mc_scores(loaded, items) -> list[list[float]]:
    """MC scoring as it was before the packed scorer (evaluate.mc_scores): the primer's cache once, then one
    batch per question of its prefix + each choice, so the question's own tokens ran once per choice and every
    batch padded to its longest choice."""
    from ..evaluate import _common_prefix

    tok, model = loaded.tokenizer, loaded.model
    prefixes = [tok(item.prefix, add_special_tokens=True)["input_ids"] for item in items]
    shared = _common_prefix(prefixes)
    scores = []
    with torch.no_grad():
        cache = model.get_decoder()(input_ids=torch.tensor([prefixes[0][:shared]]), use_cache=True).cache
        for item, prefix in zip(items, prefixes):
            own = prefix[shared:]
            seqs = [Sequence(own + tok(c, add_special_tokens=False)["input_ids"], len(own)) for c in item.choices]
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(seqs))
            scores.append(losses.answer_logprobs(model, collate(seqs, tok.pad_token_id or 0),
                                                 past_key_values=past).tolist())
    return scores
