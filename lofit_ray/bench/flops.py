"""FLOP counts of the work a step or an evaluation cannot avoid, and the matmul rate this device sustains:
their ratio is the floor a measured time is compared with.

Forward FLOP model (an approximation: norms, softmax and elementwise ops are not counted):
2 x (non-embedding params) per token read, 2 x vocab x hidden per token whose next-token distribution is
needed (MC: answer tokens; generation: generated tokens), and attention 4 x layers x (heads x head_dim) x
context, context = the keys a token attends to (QK^T and AV, 2 FLOPs per multiply-add each).
"""
from __future__ import annotations

import time

import torch


def matmul_peak_flops(dtype: torch.dtype = torch.float32, device: str = "cpu", n: int | None = None,
                      per_timing: int = 3, timings: int = 5, sync=lambda: None) -> float:
    """FLOP/s of the best of `timings` timings of `per_timing` n x n @ n x n products in `dtype`: what this
    device sustains with the current thread count, not its datasheet figure."""
    n = n or (8192 if device == "cuda" else 2048)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    for _ in range(3 if device == "cuda" else 1):  # warm-up: kernel choice, clocks
        a @ b
    sync()
    best = float("inf")
    for _ in range(timings):
        start = time.perf_counter()
        for _ in range(per_timing):
            a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return per_timing * 2 * n ** 3 / best


def model_dims(loaded) -> dict:
    model, layout = loaded.model, loaded.layout
    embed = model.get_input_embeddings().weight
    decoder = sum(p.numel() for p in model.get_decoder().parameters())
    return {"non_embedding_params": decoder - embed.numel(), "vocab": embed.shape[0], "hidden": embed.shape[1],
            "layers": layout.num_layers, "attn_width": layout.num_heads * layout.head_dim}


def span_context(start: int, length: int) -> int:
    """Sum of contexts (keys attended) of tokens at 0-based positions start .. start+length-1: position p sees p+1."""
    return length * start + length * (length + 1) // 2


def forward_flops(dims: dict, tokens: int, head_tokens: int, context_sum: int) -> dict:
    body = 2 * dims["non_embedding_params"] * tokens
    head = 2 * dims["vocab"] * dims["hidden"] * head_tokens
    attention = 4 * dims["layers"] * dims["attn_width"] * context_sum
    return {"flops": body + head + attention, "body_flops": body, "lm_head_flops": head, "attention_flops": attention}


def mc_flop_floor(loaded, items, peak_flops: float) -> dict:
    """The least work MC scoring can do: the shared primer once, each question's own prefix tokens once, each
    choice's answer tokens once (LM head at answer tokens only)."""
    from ..evaluate import _common_prefix

    tok = loaded.tokenizer
    prefixes = [tok(item.prefix, add_special_tokens=True)["input_ids"] for item in items]
    shared = _common_prefix(prefixes) if len(prefixes) > 1 else 0
    tokens, answer, ctx = shared, 0, span_context(0, shared)
    for item, prefix in zip(items, prefixes):
        own = len(prefix) - shared
        tokens += own
        ctx += span_context(shared, own)
        for choice in item.choices:
            a = len(tok(choice, add_special_tokens=False)["input_ids"])
            tokens += a
            answer += a
            ctx += span_context(len(prefix), a)
    flops = forward_flops(model_dims(loaded), tokens, answer, ctx)
    return {"primer_tokens": shared, "tokens": tokens, "answer_tokens": answer, **flops,
            "peak_flops": peak_flops, "floor_s": flops["flops"] / peak_flops}


def gen_flop_floor(loaded, prompt_lens: list[int], gen_lens: list[int], peak_flops: float) -> dict:
    """Greedy generation's least work: each prompt token and each generated token through the body once, the LM
    head once per generated token; attention over each token's real context. Memory bandwidth, which bounds
    small-batch generation far above this, is ignored."""
    tokens = sum(prompt_lens) + sum(gen_lens)
    ctx = sum(span_context(0, p) + span_context(p, g) for p, g in zip(prompt_lens, gen_lens))
    flops = forward_flops(model_dims(loaded), tokens, sum(gen_lens), ctx)
    return {"prompt_tokens": sum(prompt_lens), "generated_tokens": sum(gen_lens), "tokens": tokens, **flops,
            "peak_flops": peak_flops, "floor_s": flops["flops"] / peak_flops}


TRAINING_FLOPS_FORMULA = (
    "per token: 2*P*n (layer matmuls, forward) + 2*P*n (backward: activation gradients only, the base weights "
    "are frozen) + 12*n*T*H*D (attention scores and weighted sum over all T keys, forward 4 + backward 8) + "
    "4*d*V*a (LM head and its input gradient at answer positions only); P = parameters of one decoder layer, "
    "n = layers run (all in phase 1, from the lowest selected head up in phase 2), T = seq_len, H*D = "
    "heads*head_dim, d = hidden, V = vocab, a = answer positions per token; norms, softmax and elementwise ops "
    "are not counted")


def training_flops_per_token(model, layout, batch, layers_run: int) -> float:
    """FLOPs per token of one LoFiT training step on `batch` (TRAINING_FLOPS_FORMULA)."""
    from ..architectures import decoder_layers

    cfg = model.config
    layers = decoder_layers(model)
    per_layer = sum(p.numel() for p in layers.parameters()) / len(layers)
    T, width = batch.input_ids.shape[1], layout.num_heads * layout.head_dim
    answer_per_token = batch.answer_mask[:, 1:].sum().item() / batch.input_ids.numel()
    return (4 * per_layer * layers_run + 12 * layers_run * T * width
            + 4 * cfg.hidden_size * cfg.vocab_size * answer_per_token)
