"""Answer-only log-likelihoods, the SFT and DPO losses, the L1 penalty, and the key of the reference cache.

The LM head and log-softmax run only at answer positions: with a 49k-token
vocabulary that head is a large share of a small model's compute.
"""
from __future__ import annotations

import hashlib
import json

import torch
import torch.nn.functional as F

from . import cache_version
from .batching import Batch, tree_attention_mask


def answer_logprobs(model, batch: Batch, past_key_values=None, inputs_embeds=None) -> torch.Tensor:
    """Sum of log p(answer token) per input sequence: [batch.num_sequences].

    With `past_key_values` (a shared prefix already run), the batch holds only the tokens after
    it; right padding needs no mask then, since padding only ever follows real tokens. A packed batch
    (batching.pack) passes its position ids and no mask, or, when its pairs share prompts, the tree mask
    of its spans. With `inputs_embeds` (hidden states cached by lofit_ray.frozen_layers), the decoder
    starts there.
    """
    mask = None if past_key_values is not None else batch.attention_mask
    if batch.group is not None:
        dtype = inputs_embeds.dtype if inputs_embeds is not None else next(model.parameters()).dtype
        mask = tree_attention_mask(batch.group, batch.branch, batch.position_ids, model.config, dtype)
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": batch.input_ids}
    hidden = model.get_decoder()(**inputs, attention_mask=mask, position_ids=batch.position_ids,
                                 cache=past_key_values, use_cache=past_key_values is not None,
                                 ).last_hidden_state
    rows, states, cols = batch.answer_positions()
    token_logp = token_logprobs(model, hidden[rows, states], batch.input_ids[rows, cols])
    owner = batch.sequence[rows, cols]
    return torch.zeros(batch.num_sequences, device=token_logp.device, dtype=token_logp.dtype).index_add(
        0, owner, token_logp)


def token_logprobs(model, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target | state) for [N, hidden] final hidden states: the LM head on those N rows only."""
    logits = model.get_output_embeddings()(states)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]


def sft_loss(model, batch: Batch) -> torch.Tensor:
    """Mean negative log-likelihood per answer token."""
    return -answer_logprobs(model, batch).sum() / batch.answer_mask.sum().clamp(min=1)


def dpo_loss(policy_logp: torch.Tensor, reference_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """policy/reference log-probs laid out [chosen..., rejected...] (as batch_items collates pairs)."""
    n = policy_logp.shape[0] // 2
    margin = (policy_logp[:n] - reference_logp[:n]) - (policy_logp[n:] - reference_logp[n:])
    return -F.logsigmoid(beta * margin).mean()


def l1_penalty(scale: torch.Tensor) -> torch.Tensor:
    return scale.abs().sum()


def data_key(fingerprint: str, encoded: list, max_length: int) -> str:
    """A key for reference log-probs: the model's LoadedModel.cache_key (fingerprint and dtype), the exact token ids
    and the code version."""
    digest = hashlib.sha256(f"{fingerprint}:{max_length}:{cache_version.CACHE_VERSION}".encode())
    digest.update(json.dumps([[c.ids, c.answer_start, r.ids, r.answer_start] for c, r in encoded]).encode())
    return digest.hexdigest()[:24]
