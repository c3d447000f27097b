"""Agreement with the paper's own code (issue 27): run reference/lo-fit as it is, replay its exact batches in
lofit-ray, and compare the two.

The reference (github.com/fc2869/lo-fit, MIT) runs in its own virtualenv (scripts/reference_env.sh) from a
temporary copy patched by jobs/reference/cpu.patch (model path, wandb off, evaluation off, a per-step trace of
its token batches and losses, the initial A / v, the trained model saved in transformers' format). Nothing of
its code lives here: this module only

* exports the project's SmolLM2 checkpoint in a form transformers 4.39 reads (`export_reference_model`);
* builds the patched copy and the reference's `dataset/` folder of symlinks (`prepare_tree`);
* converts what the reference writes (model.safetensors with `model.layers.{i}.self_attn.attn_A.{j}` /
  `attn_v.{j}` vectors, `top_heads/*.npy` of (layer, head) rows best first) into a lofit-ray HeadSet and
  Adapter (`read_reference_tensors`, `reference_head_set`, `reference_adapter`);
* reads the trace back as lofit-ray `Sequence`s and per-epoch orders, so lofit-ray's own train_loop can run
  the very same batches from the very same initial values (`replayed_batches`);
* computes the agreement statistics (Spearman, top-k Jaccard and its chance level, offset cosines).

Torch only: no Ray, no MLflow.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import batching, losses, train
from ..adapter import Adapter, AdapterConfig
from ..batching import Sequence
from ..heads import HeadSet, rank_by_score
from ..offsets import HeadOffsets

REF_MODEL_NAME = "smollm2_135m"  # the models_map key cpu.patch adds; its path comes from $LOFIT_REF_MODEL
ATTN_KEY = re.compile(r"^model\.layers\.(\d+)\.self_attn\.attn_(A|v)\.(\d+)$")
PATCH = Path(__file__).resolve().parents[2] / "jobs" / "reference" / "cpu.patch"

# The paper's flags for Llama-2-7B (reference train_script_truthfulqa.sh and train_script_clutrr.sh, the
# uncommented llama2_7B blocks): phase-1 lr and L1, phase-2 lr; batch 8, 5 epochs, DPO beta 0.5 (default).
PAPER_FLAGS = {
    "truthfulqa": {"a_lr": 5e-3, "l1": 5e-4, "v_lr": 1e-2, "dpo_beta": 0.5},
    "clutrr": {"a_lr": 5e-4, "l1": 5e-3, "v_lr": 1e-2, "dpo_beta": 0.5},
}


@dataclass
class Scale:
    """The reduced, matched scale of one comparison (the same in both implementations)."""

    train_size: int = 32  # --train_size: the reference samples this many training rows with random.sample
    epochs: int = 5
    batch_size: int = 8
    seed: int = 42
    k: int = 16  # heads tuned in phase 2 (the reference's top-K from phase 1)
    val_limit: int = 0  # 0 = the whole val split
    threads: int = 2


# -- the model, exported for transformers 4.39 ---------------------------------------------------------

def export_reference_model(source: Path, dest: Path) -> Path:
    """A checkpoint folder transformers 4.39 loads as the same model: the weights linked, config.json with
    `rope_theta` (transformers 5 writes `rope_parameters`, which 4.39 ignores, falling back to 10000) and
    `torch_dtype`, and a tokenizer_config.json naming PreTrainedTokenizerFast (transformers 5 writes
    `TokenizersBackend`, unknown to 4.39), and tokenizer.json with its BPE merges as "a b" strings (tokenizers
0.15 cannot read the pair lists newer tokenizers write). `dest`'s name must contain 'llama': the reference picks its
    Llama class by that substring of the model path (lofit_trainer.py:149)."""
    source, dest = Path(source), Path(dest)
    if "llama" not in dest.name:
        raise ValueError(f"{dest}: the folder name must contain 'llama' (lofit_trainer.py picks its model class "
                         f"by `'llama' in model_name`)")
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    config["torch_dtype"] = config.pop("dtype", "float32")
    config.pop("transformers_version", None)
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    tok = json.loads((source / "tokenizer_config.json").read_text())
    keep = {k: tok[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length") if k in tok}
    keep["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dest / "tokenizer_config.json").write_text(json.dumps(keep, indent=1))
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", dest / "generation_config.json")
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    merges = tokenizer.get("model", {}).get("merges")
    if merges and isinstance(merges[0], list):  # tokenizers >= 0.20 writes pairs; 0.15 reads "a b" strings
        if any(" " in part for pair in merges for part in pair):
            raise ValueError("a BPE merge holds a space: it cannot be written in tokenizers 0.15's format")
        tokenizer["model"]["merges"] = [" ".join(pair) for pair in merges]
    tokenizer["model"].pop("ignore_merges", None)
    (dest / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    link = dest / "model.safetensors"
    if not link.exists():
        link.symlink_to((source / "model.safetensors").resolve())
    return dest


# -- the patched reference tree ------------------------------------------------------------------------

def prepare_tree(reference: Path, data: Path, dest: Path, patch: Path = PATCH) -> Path:
    """A fresh copy of the reference at `dest`, cpu.patch applied, and its `dataset/` as symlinks into the
    shared data: the loaders read a `test` file per task and the test splits are withheld, so `test` points
    at `val` (nothing here scores the test file: cpu.patch skips the reference's test())."""
    reference, data, dest = Path(reference), Path(data), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(reference, dest, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    for path in dest.rglob("*"):
        path.chmod(path.stat().st_mode | 0o200)
    subprocess.run(["patch", "-p1", "--quiet", "-i", str(Path(patch).resolve())], cwd=dest, check=True)
    links = {
        "truthfulqa": {f"fold_0_{s}_seed_42.csv": f"truthfulqa/fold_0_{t}_seed_42.csv"
                       for s, t in (("train", "train"), ("val", "val"), ("test", "val"))},
        "clutrr": {f"{s}.json": f"clutrr/{t}.json" for s, t in (("train", "train"), ("val", "val"), ("test", "val"))},
    }
    for folder, names in links.items():
        (dest / "dataset" / folder).mkdir(parents=True, exist_ok=True)
        for name, target in names.items():
            (dest / "dataset" / folder / name).symlink_to((data / target).resolve())
    return dest


def top_heads_file(task: str, k_saved: int, seed: int) -> str:
    """Where the reference's phase A writes its head list (lofit_trainer.py:318), relative to its cwd."""
    return f"top_heads/{REF_MODEL_NAME}_{task}_Aonly_top{k_saved}heads_{seed}.npy"


def reference_command(python: str, task: str, component: str, scale: Scale, flags: dict, output_dir: Path,
                      heads_npy: str | None = None, k_saved: int = 270) -> list[str]:
    """The reference's own entry point with the paper's flags (train_script_*.sh) at the reduced scale."""
    cmd = [python, "lofit_trainer.py", "--task", task, "--base_model_name", REF_MODEL_NAME,
           "--apply_chat_template", "False", "--ft_method", "lofit", "--lofit_component", component,
           "--train_batch", str(scale.batch_size), "--num_epoch", str(scale.epochs),
           "--output_dir", str(output_dir), "--run_mode", "train", "--output_file_name", str(output_dir / "out"),
           "--applied_module", "attention", "--save_strategy", "no", "--eval_batch", "32",
           "--train_size", str(scale.train_size), "--seed", str(scale.seed), "--dpo_beta", str(flags["dpo_beta"])]
    if task == "truthfulqa":
        cmd += ["--tqa_fold_num", "0"]
    if component == "A":
        cmd += ["--use_topk_heads", str(k_saved), "--lr", str(flags["a_lr"]), "--l1_lambda", str(flags["l1"])]
    else:
        cmd += ["--use_topk_heads", str(scale.k), "--lofit_heads", heads_npy, "--lr", str(flags["v_lr"]),
                "--l1_lambda", "0"]
    return cmd


def run_reference(python: str, tree: Path, model_dir: Path, task: str, component: str, scale: Scale,
                  out: Path, heads_npy: str | None = None, k_saved: int = 270) -> dict:
    """Run one phase of the reference in `tree`; trace, initial values, trained model and log land in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.jsonl"
    if trace.exists():
        trace.unlink()
    env = dict(os.environ, LOFIT_REF_MODEL=str(model_dir), LOFIT_REF_TRACE=str(trace), LOFIT_REF_SKIP_TEST="1",
               OMP_NUM_THREADS=str(scale.threads), MKL_NUM_THREADS=str(scale.threads), WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(tree))
    cmd = reference_command(python, task, component, scale, PAPER_FLAGS[task], out / "model", heads_npy, k_saved)
    start = time.time()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    if proc.returncode:
        raise RuntimeError(f"reference {task}/{component} failed (rc {proc.returncode}); see {out / 'log.txt'}")
    return {"command": " ".join(cmd[1:]), "wall_seconds": round(wall, 1)}


# -- what the reference writes, converted --------------------------------------------------------------

def read_reference_tensors(source, num_layers: int, num_heads: int) -> dict[str, torch.Tensor]:
    """{"A": [L, H, D], "v": [L, H, D]} from the reference's per-head vectors, keyed as its LlamaAttention
    ParameterLists name them (`model.layers.{i}.self_attn.attn_A.{j}`, models/modeling_llama.py:258-260).
    `source`: a saved model folder or .safetensors file (the transformers format Trainer.save_model writes), a
    torch.save'd dict (cpu.patch's init dump), or that dict itself. Heads the file lacks stay zero, as in the
    reference, which creates every vector as zeros."""
    if isinstance(source, dict):
        tensors = source
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "model.safetensors"
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            tensors = {}
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if ATTN_KEY.match(key):
                        tensors[key] = f.get_tensor(key)
        else:
            tensors = torch.load(path, map_location="cpu")
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = ATTN_KEY.match(key)
        if not m:
            continue
        layer, kind, head = int(m.group(1)), m.group(2), int(m.group(3))
        if kind not in out:
            out[kind] = torch.zeros(num_layers, num_heads, value.numel())
        out[kind][layer, head] = value.detach().float().flatten()
    return out


def read_top_heads(path) -> list[tuple[int, int]]:
    """The reference's head list: an int array of (layer, head) rows, best first (lofit_trainer.py:304-318)."""
    rows = np.load(path)
    if rows.ndim != 2 or rows.shape[1] != 2:
        raise ValueError(f"{path}: expected (layer, head) rows, got shape {rows.shape}")
    return [(int(l), int(h)) for l, h in rows]


def reference_head_set(A: torch.Tensor, *, model: str, fingerprint: str, layout: dict, task: str, seed: int,
                       hparams: dict | None = None) -> HeadSet:
    """The reference's phase-1 ranking as a lofit-ray HeadSet: every head scored by ||A||_2 (the reference
    ranks by np.linalg.norm of each head's A, lofit_trainer.py:300-306)."""
    return HeadSet(model=model, fingerprint=fingerprint, layout=layout, ranking=rank_by_score(A.norm(dim=-1)),
                   method="lofit-reference", task=task, seed=seed, hparams=hparams or {})


def reference_adapter(v: torch.Tensor, heads: list[tuple[int, int]], *, model: str, fingerprint: str,
                      layout: dict, task: str, hparams: dict | None = None) -> Adapter:
    """The reference's trained offsets on `heads` (its --lofit_heads top-K) as a lofit-ray Adapter. The
    reference adds v to each selected head's attention output before o_proj with A = 0 in phase v
    (models/modeling_llama.py:367-369), which is exactly lofit-ray's z <- z + v on the same heads."""
    if v.shape[:2] != (layout["num_layers"], layout["num_heads"]):
        raise ValueError(f"v has shape {tuple(v.shape)}, layout is {layout['num_layers']}x{layout['num_heads']}")
    config = AdapterConfig(base_model=model, fingerprint=fingerprint, layout=layout,
                           heads=[[l, h] for l, h in heads], task=task, method="lofit-reference",
                           head_set={"method": "lofit-reference", "task": task, "k": len(heads)},
                           hparams=hparams or {})
    return Adapter(config, torch.stack([v[l, h] for l, h in heads]))


# -- the trace: the reference's batches, replayed ---------------------------------------------------------

def _sequence(ids: list[int], mask: list[int], labels: list[int]) -> Sequence:
    keep = [i for i, m in enumerate(mask) if m]
    ids = [ids[i] for i in keep]
    labels = [labels[i] for i in keep]
    answer = [i for i, l in enumerate(labels) if l != -100]
    if not answer:
        raise ValueError("a traced sequence has no labelled token")
    if labels[answer[0]:] != ids[answer[0]:]:
        raise ValueError("labels are not a suffix of the sequence; lofit-ray scores answers as a suffix")
    return Sequence(ids, answer[0])


def read_trace(path) -> list[dict]:
    """Per step: {"loss" (with L1), "l1", "task_loss", "items": [Sequence] (SFT) or [(chosen, rejected)] (DPO),
    "reference": [[chosen, rejected] log-probs] (DPO)}."""
    steps = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        x = rec["inputs"]
        if "chosen_input_ids" in x:
            items = [(_sequence(c, cm, cl), _sequence(r, rm, rl)) for c, cm, cl, r, rm, rl in zip(
                x["chosen_input_ids"], x["chosen_attention_mask"], x["chosen_labels"],
                x["rejected_input_ids"], x["rejected_attention_mask"], x["rejected_labels"])]
            ref = [[c, r] for c, r in zip(x.get("reference_chosen_logps", []), x.get("reference_rejected_logps", []))]
        else:
            items = [_sequence(i, m, l) for i, m, l in zip(x["input_ids"], x["attention_mask"], x["labels"])]
            ref = []
        steps.append({"loss": rec["loss"], "l1": rec["l1"], "task_loss": rec["loss"] - rec["l1"], "items": items,
                      "reference": ref})
    return steps


def _key(item) -> tuple:
    return tuple(tuple(s.ids) for s in item) if isinstance(item, tuple) else tuple(item.ids)


def examples_and_orders(steps: list[dict], batch_size: int) -> tuple[list, list[list[int]], list]:
    """(unique examples in first-seen order, the index order of each epoch, per example the reference's
    traced DPO reference log-probs or None). Every epoch must visit every example once in whole batches."""
    index, examples, refs, flat = {}, [], [], []
    for step in steps:
        for j, item in enumerate(step["items"]):
            key = _key(item)
            if key not in index:
                index[key] = len(examples)
                examples.append(item)
                refs.append(step["reference"][j] if step["reference"] else None)
            flat.append(index[key])
    n = len(examples)
    if n % batch_size or len(flat) % n:
        raise ValueError(f"{len(flat)} traced items over {n} examples: use a training size divisible by the "
                         f"batch size ({batch_size}) so both implementations step through whole batches")
    orders = [flat[e * n:(e + 1) * n] for e in range(len(flat) // n)]
    for e, order in enumerate(orders):
        if sorted(order) != list(range(n)):
            raise ValueError(f"epoch {e + 1} of the trace does not visit every example exactly once")
    return examples, orders, refs


@contextlib.contextmanager
def replayed_batches(orders: list[list[int]]):
    """lofit-ray's own train_loop, fed pre-encoded Sequences (encode_examples passes them through) and the
    reference's per-epoch order (epoch_order returns it): the same tokens in the same batches."""
    saved = batching.encode_examples, train.epoch_order
    batching.encode_examples = lambda tokenizer, examples, max_length: list(examples)
    train.epoch_order = lambda n, training, epoch: list(orders[epoch])
    try:
        yield
    finally:
        batching.encode_examples, train.epoch_order = saved


class RecordingStepper:
    """Wraps a stepper; records each step's loss (with the penalty) and the penalty itself."""

    def __init__(self, inner, penalty=None):
        self.inner, self.penalty = inner, penalty
        self.lr = getattr(inner, "lr", None)
        self.losses: list[float] = []
        self.penalties: list[float] = []

    def backward(self, loss):
        self.losses.append(loss.item())
        with torch.no_grad():
            self.penalties.append(float(self.penalty()) if self.penalty else 0.0)
        self.inner.backward(loss)

    def step(self):
        self.inner.step()


def make_stepper(kind: str, params, lr: float, total_steps: int):
    if kind == "as_is":
        return train.TorchStepper(params, lr)
    if kind == "trainer_like":  # what the reference's Trainer does by default (transformers 4.39): lofit-ray's
        # phase1/phase2 lr_schedule: linear with max_grad_norm: 1.0 (AdamW, weight decay 0, decay to 0, no warmup)
        return train.TorchStepper(params, lr, max_grad_norm=1.0, lr_schedule="linear", total_steps=total_steps)
    raise ValueError(f"stepper kind {kind!r}: as_is or trainer_like")


def lofit_phase1(loaded, examples: list, orders: list[list[int]], training, lr: float, l1: float,
                 init_A: torch.Tensor, stepper: str = "as_is") -> dict:
    """lofit-ray's phase 1 (selectors._l1: a scale A on every head, loss + l1 * sum|A|, AdamW) from the
    reference's initial A, over the reference's batches. Returns per-head ||A||, step losses, wall time."""
    offsets = HeadOffsets(loaded.layout, scale=True, seed=training.seed).attach(loaded.model)
    with torch.no_grad():
        offsets.scale.copy_(init_A)
    penalty = (lambda: l1 * losses.l1_penalty(offsets.scale)) if l1 else None
    rec = RecordingStepper(make_stepper(stepper, [offsets.scale], lr, len(orders) * len(orders[0]) //
                                        training.batch_size), penalty)
    start = time.time()
    try:
        with replayed_batches(orders):
            history = train.train_loop(loaded, examples, training, len(orders), rec, penalty=penalty,
                                       base_model=offsets.disabled, label="phase 1 ")
    finally:
        offsets.detach()
    return {"A": offsets.scale.detach().float().clone(), "step_loss": rec.losses, "step_l1": rec.penalties,
            "history": history, "wall_seconds": round(time.time() - start, 1)}


def lofit_phase2(loaded, examples: list, orders: list[list[int]], training, lr: float,
                 heads: list[tuple[int, int]], init_v: torch.Tensor, stepper: str = "as_is") -> dict:
    """lofit-ray's phase 2 (train.train_offsets: v on `heads`, lower layers run once) from the reference's
    initial v on those heads, over the reference's batches."""
    offsets = HeadOffsets(loaded.layout, offset_heads=heads, seed=training.seed).attach(loaded.model)
    with torch.no_grad():
        offsets.offset.copy_(torch.stack([init_v[l, h] for l, h in heads]))
    rec = RecordingStepper(make_stepper(stepper, [offsets.offset], lr, len(orders) * len(orders[0]) //
                                        training.batch_size))
    start = time.time()
    try:
        with replayed_batches(orders):
            history = train.train_loop(loaded, examples, training, len(orders), rec,
                                       start_layer=offsets.lowest_layer(), base_model=offsets.disabled,
                                       label="phase 2 ")
    finally:
        offsets.detach()
    return {"offsets": offsets, "step_loss": rec.losses, "history": history,
            "wall_seconds": round(time.time() - start, 1)}


# -- statistics ---------------------------------------------------------------------------------------

def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), 0-based."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a, b) -> float:
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra ** 2).sum() * (rb ** 2).sum()))


def top_k(scores, k: int) -> set[int]:
    flat = np.asarray(scores, dtype=float).ravel()
    return set(np.argsort(-flat, kind="mergesort")[:k].tolist())


def jaccard_top_k(a, b, k: int) -> float:
    x, y = top_k(a, k), top_k(b, k)
    return len(x & y) / len(x | y)


def jaccard_chance(n: int, k: int) -> float:
    """E[|X & Y| / |X | Y|] for two independent uniformly random k-subsets of n items (hypergeometric)."""
    total = math.comb(n, k)
    return sum(math.comb(k, i) * math.comb(n - k, k - i) / total * i / (2 * k - i) for i in range(k + 1))


def cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Row-wise cosine of two [K, D] tensors."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).tolist()


@dataclass
class StepComparison:
    reference: list[float]
    lofit: list[float]
    abs_diff: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.abs_diff = [abs(a - b) for a, b in zip(self.reference, self.lofit)]

    def as_dict(self, first: int = 20) -> dict:
        d = asdict(self)
        return {k: [round(x, 6) for x in v[:first]] for k, v in d.items()} | {
            "max_abs_diff": round(max(self.abs_diff[:first]), 6) if self.abs_diff else None}
