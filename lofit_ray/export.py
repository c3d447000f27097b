"""A merged LoFiT checkpoint that stock transformers loads with the hooked model's logits.

Merging turns the offsets v into a bias on each attention output projection: o_proj(z + v) = W z + W v.
A stock checkpoint can carry that bias only where its family's config can switch the bias on. Routes,
tried in order:

  1. the projection has a bias already (gpt_neox with attention_bias): the same config;
  2. a boolean config flag gives it one (llama, qwen3, gemma, gemma2, gemma3_text, olmo2, granite:
     attention_bias): found by building the model with each `*bias*` flag on, on the meta device.
     Other biases the flag switches on (q/k/v) are written as zeros;
  3. the family is Llama up to things Llama's config expresses, so the checkpoint is re-written as a
     Llama one (`LLAMA_EQUIVALENT`): mistral (no sliding window within max_position_embeddings),
     qwen2 (q/k/v biases; no sliding-window layers), phi3 (full rotary; its fused qkv_proj and
     gate_up_proj are split into Llama's q/k/v and gate/up). Same norms (RMSNorm, weight * x),
     rotary embedding, MLP (down(act(gate) * up)), attention scaling and residuals;
  4. otherwise UnsupportedArchitectureError, saying why and to attach the adapter instead.
"""
from __future__ import annotations

import contextlib

import torch

from .architectures import UnsupportedArchitectureError, o_projs

LLAMA_EQUIVALENT = ("mistral", "qwen2", "phi3")


def _build(config, dtype: torch.dtype, meta: bool = False):
    """The model of `config`, on the meta device, or on CPU with weights left uninitialised (they get loaded)."""
    from transformers import AutoModelForCausalLM

    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older/newer transformers: random init, then overwritten
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _copy(config):
    return config.__class__.from_dict(config.to_dict())


def _with_bias_flag(config):
    """A copy of `config` whose output projections have a bias, or None when no boolean flag does that."""
    if o_projs(_build(config, torch.float32, meta=True))[0].bias is not None:
        return _copy(config)
    flags = [k for k, v in config.to_dict().items() if "bias" in k and v is False]
    flags.sort(key=lambda k: "att" not in k)  # attention_bias before mlp_bias and the like
    for flag in flags:
        candidate = _copy(config)
        setattr(candidate, flag, True)
        if o_projs(_build(candidate, torch.float32, meta=True))[0].bias is not None:
            return candidate
    return None


def _sliding(config) -> bool:
    """Whether some layer attends within a window shorter than the context the config declares."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return False
    return window < config.max_position_embeddings


def _as_llama(config):
    """(LlamaConfig, state-dict converter) for a family identical to Llama but for an o_proj bias flag."""
    from transformers import LlamaConfig

    kind = config.model_type
    if _sliding(config):
        raise UnsupportedArchitectureError(
            f"export: this {kind} model attends within a sliding window of {config.sliding_window} tokens "
            f"(< max_position_embeddings {config.max_position_embeddings}) and {kind}'s config cannot give "
            f"o_proj a bias; no stock family with a bias flag computes the same. Ship the adapter directory and "
            f"attach it: lofit_ray.Adapter.from_pretrained(dir).attach(model)")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitectureError(
            f"export: this {kind} model rotates only part of each head (partial_rotary_factor "
            f"{rope['partial_rotary_factor']}), which Llama cannot express, and {kind}'s config cannot give o_proj "
            f"a bias. Ship the adapter directory and attach it: lofit_ray.Adapter.from_pretrained(dir).attach(model)")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    llama = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings, rope_parameters=rope,
        attention_bias=True, mlp_bias=False, attention_dropout=getattr(config, "attention_dropout", 0.0),
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )

    def convert(state: dict) -> dict:
        out = {}
        for name, tensor in state.items():
            if name.endswith("self_attn.qkv_proj.weight"):  # phi3: [q; k; v] rows
                q, k, v = tensor.split([heads * head_dim, kv * head_dim, kv * head_dim])
                base = name[: -len("qkv_proj.weight")]
                out |= {base + "q_proj.weight": q, base + "k_proj.weight": k, base + "v_proj.weight": v}
            elif name.endswith("mlp.gate_up_proj.weight"):  # phi3: [gate; up] rows
                gate, up = tensor.chunk(2)
                base = name[: -len("gate_up_proj.weight")]
                out |= {base + "gate_proj.weight": gate, base + "up_proj.weight": up}
            else:
                out[name] = tensor
        return out

    return llama, convert


def merged_checkpoint(model, full_offset: torch.Tensor):
    """A new model (the source is untouched) that stock transformers can save and load, v folded into the
    output projections' biases. full_offset: [layers, heads, head_dim], as HeadOffsets.full_offset()."""
    config, convert = _with_bias_flag(model.config), (lambda state: state)
    if config is None:
        if model.config.model_type not in LLAMA_EQUIVALENT:
            raise UnsupportedArchitectureError(
                f"export: '{model.config.model_type}' has no config flag that gives its attention output "
                f"projection a bias, and lofit-ray knows no identical family that has one, so a merged "
                f"checkpoint would not load in stock transformers. Ship the adapter directory instead and attach "
                f"it: lofit_ray.Adapter.from_pretrained(dir).attach(model), or merge in memory with "
                f"merge_and_unload(model)")
        config, convert = _as_llama(model.config)
    dtype = next(model.parameters()).dtype
    merged = _build(config, dtype)
    missing, unexpected = merged.load_state_dict(convert(model.state_dict()), strict=False)
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise RuntimeError(f"export: state dicts disagree (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name in missing:  # the biases the new config switched on start at zero
            merged.get_parameter(name).zero_()
    merged.eval()
    return merge_offsets(merged, full_offset)


def merge_offsets(model, full: torch.Tensor):
    """Add W v to each o_proj's bias (creating a zero bias where there is none); full: [layers, heads, head_dim]."""
    for layer, proj in enumerate(o_projs(model)):
        if not full[layer].any():
            continue
        extra = proj.weight.detach().float() @ full[layer].flatten().to(proj.weight.device)
        if proj.bias is None:
            proj.bias = torch.nn.Parameter(torch.zeros(proj.out_features, dtype=proj.weight.dtype,
                                                       device=proj.weight.device), requires_grad=False)
        with torch.no_grad():
            proj.bias.add_(extra.to(proj.bias.dtype))
    return model
