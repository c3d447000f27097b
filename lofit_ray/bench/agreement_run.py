"""The stages of jobs/agree_reference.py (issue 27): reference phase A, lofit-ray phase 1 on its batches, reference
phase v, lofit-ray phase 2 on its heads and batches, paired val scores, summary. Each returns a JSON-able dict;
heavy ones run inside `heavy(name)` (the shared lock). Torch only: no Ray, no MLflow."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import agreement as ag

_LOADED = {}
SPEC = "smollm2-135m"
CUT = "em_before_literal_eos"  # exact match of the generation cut at the first literal "</s>" (D4)


def _loaded():
    if "m" not in _LOADED:
        from ..models import load_model

        _LOADED["m"] = load_model(SPEC)
    return _LOADED["m"]


def _training(scale: ag.Scale, task: str):
    from ..config import TrainingConfig

    # max_length only bounds lofit-ray's own tokenisation, which the replay bypasses (pre-encoded sequences).
    return TrainingConfig(batch_size=scale.batch_size, max_length=512, dpo_beta=ag.PAPER_FLAGS[task]["dpo_beta"],
                          seed=scale.seed)


def _python(args) -> str:
    return str(Path(args.venv) / "bin" / "python")


def _round(xs, n=6):
    return [round(float(x), n) for x in xs]


def _identity(loaded) -> dict:
    return {"model": loaded.spec, "fingerprint": loaded.fingerprint, "layout": asdict(loaded.layout)}


def stage_ref_A(args, scale, out, work, heavy):
    from ..models import local_dir

    model_dir = ag.export_reference_model(local_dir(SPEC), work.parent / "smollm2-135m-llama")
    tree = ag.prepare_tree(Path(args.reference), Path(args.data), work / "tree")
    with heavy("reference phase A"):
        run = ag.run_reference(_python(args), tree, model_dir, args.task, "A", scale, work / "ref_A")
    shutil.copyfile(tree / ag.top_heads_file(args.task, 270, scale.seed), work / "ref_A" / "top_heads.npy")
    A = ag.read_reference_tensors(work / "ref_A" / "model", 30, 9)["A"]
    steps = ag.read_trace(work / "ref_A" / "trace.jsonl")
    return {**run, "head_norms": [_round(r) for r in A.norm(dim=-1).tolist()],
            "top_heads": [list(h) for h in ag.read_top_heads(work / "ref_A" / "top_heads.npy")[:32]],
            "step_loss": _round(s["loss"] for s in steps), "step_l1": _round(s["l1"] for s in steps)}


def _phase1_stats(ref_norms: torch.Tensor, norms: torch.Tensor) -> dict:
    n = ref_norms.numel()
    return {"spearman": round(ag.spearman(ref_norms, norms), 4),
            **{f"jaccard_top{k}": round(ag.jaccard_top_k(ref_norms, norms, k), 4) for k in (8, 16)},
            **{f"jaccard_top{k}_chance": round(ag.jaccard_chance(n, k), 4) for k in (8, 16)}}


def stage_lofit_A(args, scale, out, work, heavy):
    from ..train import reference_logprobs

    ref = json.loads((out / "ref_A.json").read_text())
    ref_norms = torch.tensor(ref["head_norms"])
    steps = ag.read_trace(work / "ref_A" / "trace.jsonl")
    examples, orders, ref_lp = ag.examples_and_orders(steps, scale.batch_size)
    init_A = ag.read_reference_tensors(work / "ref_A" / "trace.jsonl.init.pt", 30, 9)["A"]
    flags = ag.PAPER_FLAGS[args.task]
    result = {"n_examples": len(examples), "epochs": len(orders), "steps": len(steps), "runs": {}}
    if (out / "lofit_A.json").exists():  # keep finished runs; run only the missing ones
        result["runs"] = json.loads((out / "lofit_A.json").read_text()).get("runs", {})
        result["runs"].pop("as_is_own_init", None)  # superseded: at seed 42 lofit-ray's own init IS the reference's
    with heavy("lofit-ray phase 1"):
        loaded = _loaded()
        training = _training(scale, args.task)
        from ..offsets import HeadOffsets
        own = HeadOffsets(loaded.layout, scale=True, seed=training.seed).scale.detach()
        result["init_identical_to_reference"] = bool(torch.equal(own, init_A))
        if ref_lp[0] is not None and "dpo_reference_logp" not in result:  # DPO: the frozen model's answer log-probs, both implementations
            mine = reference_logprobs(loaded, examples, training, use_cache=False)
            theirs = torch.tensor(ref_lp)
            result["dpo_reference_logp"] = {
                "max_abs_diff": round(float((mine - theirs).abs().max()), 5),
                "mean_abs": round(float(theirs.abs().mean()), 3), "n_sequences": 2 * len(examples),
                "note": "reference computed them with A ~ N(0, 1e-3) already in place (DPOTrainer precomputes "
                        "inside train(), after lofit_trainer.py initialises A); lofit-ray with A off"}
        runs = {"as_is": ("as_is", init_A), "trainer_like": ("trainer_like", init_A),
                "trainer_like_seed43": ("trainer_like", None)}
        for name, (stepper, init) in runs.items():
            if name in result["runs"]:
                continue
            if init is None:  # another seed's init (HeadOffsets, seed 43), same batches: the init-noise floor
                init = HeadOffsets(loaded.layout, scale=True, seed=training.seed + 1).scale.detach().clone()
            r = ag.lofit_phase1(loaded, examples, orders, training, flags["a_lr"], flags["l1"], init, stepper)
            norms = r["A"].norm(dim=-1)
            result["runs"][name] = {
                "wall_seconds": r["wall_seconds"], "head_norms": [_round(x) for x in norms.tolist()],
                "step_loss": _round(r["step_loss"]), "step_l1": _round(r["step_l1"]),
                "vs_reference": _phase1_stats(ref_norms, norms),
                "step_loss_vs_reference": ag.StepComparison(ref["step_loss"], r["step_loss"]).as_dict(),
            }
            torch.save(r["A"], work / f"lofit_A_{name}.pt")
    a = torch.tensor(result["runs"]["trainer_like"]["head_norms"])
    b = torch.tensor(result["runs"]["trainer_like_seed43"]["head_norms"])
    result["init_noise_floor"] = {"what": "lofit-ray trainer_like from the seed-42 init (the reference's) vs from "
                                          "the seed-43 init, same batches", **_phase1_stats(a, b)}
    return result


def stage_ref_v(args, scale, out, work, heavy):
    from ..models import local_dir

    model_dir = ag.export_reference_model(local_dir(SPEC), work.parent / "smollm2-135m-llama")
    tree = work / "tree"
    with heavy("reference phase v"):
        run = ag.run_reference(_python(args), tree, model_dir, args.task, "v", scale, work / "ref_v",
                               heads_npy=str(work / "ref_A" / "top_heads.npy"))
    heads = ag.read_top_heads(work / "ref_A" / "top_heads.npy")[: scale.k]
    v = ag.read_reference_tensors(work / "ref_v" / "model", 30, 9)["v"]
    steps = ag.read_trace(work / "ref_v" / "trace.jsonl")
    untouched = [(l, h) for l in range(30) for h in range(9) if (l, h) not in heads and v[l, h].abs().max() > 0]
    return {**run, "heads": [list(h) for h in heads], "step_loss": _round(s["loss"] for s in steps),
            "v_norms": _round(v[l, h].norm() for l, h in heads), "nonzero_v_outside_heads": len(untouched)}


def stage_lofit_v(args, scale, out, work, heavy):
    heads = [tuple(h) for h in json.loads((out / "ref_v.json").read_text())["heads"]]
    ref = json.loads((out / "ref_v.json").read_text())
    steps = ag.read_trace(work / "ref_v" / "trace.jsonl")
    examples, orders, _ = ag.examples_and_orders(steps, scale.batch_size)
    init_v = ag.read_reference_tensors(work / "ref_v" / "trace.jsonl.init.pt", 30, 9)["v"]
    v_ref = ag.read_reference_tensors(work / "ref_v" / "model", 30, 9)["v"]
    flags = ag.PAPER_FLAGS[args.task]
    result = {"n_examples": len(examples), "epochs": len(orders), "steps": len(steps), "runs": {}}
    with heavy("lofit-ray phase 2"):
        loaded = _loaded()
        ident = _identity(loaded)
        adapters = work / "adapters"
        ag.reference_adapter(v_ref, heads, task=args.task, **ident,
                             hparams={"source": "reference/lo-fit", "lr": flags["v_lr"]}).save_pretrained(
            adapters / "reference")
        ref_rows = torch.stack([v_ref[l, h] for l, h in heads])
        for name in ("as_is", "trainer_like"):
            r = ag.lofit_phase2(loaded, examples, orders, _training(scale, args.task), flags["v_lr"], heads, init_v,
                                name)
            from ..adapter import Adapter
            Adapter.from_offsets(r["offsets"], loaded, task=args.task).save_pretrained(adapters / f"lofit_{name}")
            mine = r["offsets"].offset.detach().float()
            cos = ag.cosines(ref_rows, mine)
            result["runs"][name] = {
                "wall_seconds": r["wall_seconds"], "step_loss": _round(r["step_loss"]),
                "step_loss_vs_reference": ag.StepComparison(ref["step_loss"], r["step_loss"]).as_dict(),
                "offset_cosine": _round(cos, 4), "offset_cosine_min": round(min(cos), 4),
                "offset_cosine_mean": round(sum(cos) / len(cos), 4),
                "offset_norm_ratio": _round((mine.norm(dim=-1) / ref_rows.norm(dim=-1)).tolist(), 4),
            }
    return result


def _score(loaded, items, adapter_dir: Path | None) -> tuple[dict, list[dict]]:
    """Val metrics (with 95% intervals) and per-item rows of the base model, or with an adapter on."""
    from ..adapter import Adapter
    from ..evaluate import evaluate_items
    from ..evidence import interval, with_intervals
    from ..tasks import match_item

    start = time.time()
    offsets = Adapter.from_pretrained(adapter_dir).attach(loaded.model, loaded.fingerprint) if adapter_dir else None
    try:
        m, rows = evaluate_items(loaded, items)
    finally:
        if offsets is not None:
            offsets.detach()
    if "generated" in rows[0]:
        # The reference's SFT text ends in the literal "</s>" (D4), three ordinary tokens on SmolLM2, so
        # adapters trained on its tokens write "son</s>": score the text before it too.
        for row, item in zip(rows, items):
            row[CUT] = float(match_item(row["generated"].split("</s>")[0], item)[0])
        ci = interval([r[CUT] for r in rows])
        m.update({CUT: ci["mean"], f"{CUT}_ci_low": ci["ci_low"], f"{CUT}_ci_high": ci["ci_high"]})
    m.update(with_intervals(rows))
    m["wall_seconds"] = round(time.time() - start, 1)
    return m, rows


def _paired(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """a - b per metric, paired item by item (10,000 resamples, seed 0), with its verdict."""
    from ..evidence import compare_rows, paired, verdict

    cmp = compare_rows(rows_a, rows_b, seed=0)
    if CUT in rows_a[0]:
        cmp[CUT] = paired([r[CUT] for r in rows_a], [r[CUT] for r in rows_b], seed=0)
    return {c: {**v, "verdict": verdict(v)} for c, v in cmp.items()}


def _val_items(args, scale):
    from ..tasks import get_task

    return get_task(args.task, data_dir=args.data).eval_items(limit=scale.val_limit or None)


def stage_eval(args, scale, out, work, heavy):
    from ..evidence import write_rows

    items = _val_items(args, scale)
    names = ["base", "reference", "lofit_as_is", "lofit_trainer_like"]
    rows, metrics = {}, {}
    with heavy("val scoring"):
        loaded = _loaded()
        for name in names:
            metrics[name], rows[name] = _score(loaded, items, None if name == "base" else work / "adapters" / name)
            write_rows(work / f"eval_{name}.items.jsonl", rows[name])
    pairs = (("lofit_as_is", "reference"), ("lofit_trainer_like", "reference"), ("reference", "base"),
             ("lofit_as_is", "base"))
    return {"n_items": len(items), "metrics": metrics,
            "paired": {f"{a} - {b}": _paired(rows[a], rows[b]) for a, b in pairs}}


def stage_cross(args, scale, out, work, heavy):
    """The cross: the reference's phase v on lofit-ray's own phase-1 heads (the as_is run: lofit-ray's default
    optimizer, whose top K differs from the reference's), scored on val and paired with the reference on its own
    heads. The other half, lofit-ray's phase 2 on the reference's heads, is lofit_v."""
    import numpy as np

    from ..evidence import read_rows
    from ..heads import rank_by_score
    from ..models import local_dir

    lofit_norms = torch.tensor(json.loads((out / "lofit_A.json").read_text())["runs"]["as_is"]["head_norms"])
    ranking = [(l, h) for l, h, _ in rank_by_score(lofit_norms)]
    ref_heads = [tuple(h) for h in json.loads((out / "ref_v.json").read_text())["heads"]]
    heads = ranking[: scale.k]
    (work / "cross").mkdir(parents=True, exist_ok=True)
    npy = work / "cross" / "lofit_as_is_top_heads.npy"
    np.save(npy, np.array(ranking, dtype=np.int64))
    model_dir = ag.export_reference_model(local_dir(SPEC), work.parent / "smollm2-135m-llama")
    items = _val_items(args, scale)
    with heavy("reference phase v on lofit-ray's heads"):
        run = ag.run_reference(_python(args), work / "tree", model_dir, args.task, "v", scale, work / "cross",
                               heads_npy=str(npy))
        v = ag.read_reference_tensors(work / "cross" / "model", 30, 9)["v"]
        loaded = _loaded()
        adapter_dir = work / "adapters" / "reference_on_lofit_heads"
        ag.reference_adapter(v, heads, task=args.task, **_identity(loaded),
                             hparams={"source": "reference/lo-fit", "heads_from": "lofit-ray as_is phase 1"}
                             ).save_pretrained(adapter_dir)
        metrics, rows = _score(loaded, items, adapter_dir)
    reference_rows = read_rows(work / "eval_reference.items.jsonl")
    return {**run, "heads": [list(h) for h in heads], "n_items": len(items),
            "jaccard_vs_reference_heads": round(len(set(heads) & set(ref_heads)) / len(set(heads) | set(ref_heads)), 4),
            "step_loss": _round(s["loss"] for s in ag.read_trace(work / "cross" / "trace.jsonl")),
            "metrics": metrics,
            "paired": {"reference_on_lofit_heads - reference": _paired(rows, reference_rows)}}


def stage_summary(args, scale, out, work, heavy):
    """The formatting audit: lofit-ray's own task formatting and tokenisation of the traced examples against
    the reference's token ids (the replay above bypasses it, so this is where the two still differ)."""
    from ..batching import encode_examples
    from ..tasks import get_task

    loaded = _loaded()
    tok = loaded.tokenizer
    steps = ag.read_trace(work / "ref_A" / "trace.jsonl")
    examples, _, _ = ag.examples_and_orders(steps, scale.batch_size)
    variants = {"default": {}}
    variants["paper_text"] = {"answer_sep": ""} if args.task == "truthfulqa" else {"original_spacing": True}
    audit = {}
    for vname, kw in variants.items():
        mine = get_task(args.task, data_dir=args.data, **kw).train_examples()
        theirs = [(c if isinstance(c, tuple) else c) for c in examples]

        def seqs(item):
            return list(item) if isinstance(item, tuple) else [item]

        by_prompt = {}
        for enc in encode_examples(tok, mine, 4096):
            first = seqs(enc)[0]
            by_prompt.setdefault(tok.decode(first.ids[: first.answer_start]).strip(), enc)
        same_all = same_prompt = same_answer = found = 0
        sample = None
        for item in theirs:
            ref_seqs = seqs(item)
            text = tok.decode(ref_seqs[0].ids[: ref_seqs[0].answer_start], skip_special_tokens=True).strip()
            enc = by_prompt.get(text)
            if enc is None:
                continue
            found += 1
            pairs = list(zip(ref_seqs, seqs(enc)))
            same_all += all(r.ids == m.ids and r.answer_start == m.answer_start for r, m in pairs)
            same_prompt += all(r.ids[: r.answer_start] == m.ids[: m.answer_start] for r, m in pairs)
            same_answer += all(r.ids[r.answer_start:] == m.ids[m.answer_start:] for r, m in pairs)
            if sample is None:
                r, m = pairs[0]
                sample = {"reference_answer": tok.decode(r.ids[r.answer_start:]),
                          "lofit_answer": tok.decode(m.ids[m.answer_start:]),
                          "reference_prompt_head": tok.decode(r.ids[: min(r.answer_start, 6)]),
                          "lofit_prompt_head": tok.decode(m.ids[: min(m.answer_start, 6)]),
                          "reference_prompt_tokens": r.answer_start, "lofit_prompt_tokens": m.answer_start}
        audit[vname] = {"options": kw, "matched_by_prompt_text": found, "of": len(theirs),
                        "identical_tokens": same_all, "identical_prompt_tokens": same_prompt,
                        "identical_answer_tokens": same_answer, "example": sample}
    lengths = [len(s.ids) for item in examples for s in (item if isinstance(item, tuple) else (item,))]
    return {"formatting_audit": audit,
            "reference_sequence_tokens": {"min": min(lengths), "max": max(lengths),
                                          "over_lofit_default_max_length_128": sum(n > 128 for n in lengths),
                                          "n": len(lengths)}}


STAGES = {"ref_A": stage_ref_A, "lofit_A": stage_lofit_A, "ref_v": stage_ref_v, "lofit_v": stage_lofit_v,
          "eval": stage_eval, "cross": stage_cross, "summary": stage_summary}


def run_stage(stage, args, scale, out, work, heavy):
    return STAGES[stage](args, scale, out, work, heavy)


def _fmt(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _paired_table(pairs: dict, cols: list[str]) -> list[str]:
    lines = ["| paired difference | metric | diff [95% CI] | p | verdict |", "|---|---|---|---|---|"]
    for pair, by in pairs.items():
        for c in cols:
            v = by[c]
            lines.append(f"| {pair} | {c} | {v['diff']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}] | "
                         f"{v['p_value']:.3f} | {v['verdict']} |")
    return lines + [""]


def report_tables(results: Path) -> str:
    """Markdown tables of every finished stage under results/<task>/ (docs/agreement.md pastes them)."""
    lines = []
    for task_dir in sorted(p for p in Path(results).iterdir() if p.is_dir()):
        task = task_dir.name
        get = lambda s: json.loads((task_dir / f"{s}.json").read_text()) if (task_dir / f"{s}.json").exists() else None
        refA, lofA, refv, lofv, ev = get("ref_A"), get("lofit_A"), get("ref_v"), get("lofit_v"), get("eval")
        cross = get("cross")
        if not refA:
            continue
        sc = refA["scale"]
        lines += [f"### {task}", "",
                  f"Scale: {sc['train_size']} training examples, {sc['epochs']} epochs, batch {sc['batch_size']}, "
                  f"seed {sc['seed']}, phase 2 on the reference's top {sc['k']} heads, {sc['threads']} torch threads; "
                  f"flags {json.dumps(ag.PAPER_FLAGS[task])}.", ""]
        if lofA:
            lines += ["**Phase 1** (per-head ||A||, all 270 heads; one run each, seed 42, the reference's batches):", "",
                      "| lofit-ray run | Spearman | Jaccard top 8 (chance) | Jaccard top 16 (chance) | max abs step-loss diff, "
                      "first 20 steps | wall s |", "|---|---|---|---|---|---|"]
            for name, r in lofA["runs"].items():
                s = r["vs_reference"]
                lines.append(f"| {name} | {s['spearman']:.3f} | {s['jaccard_top8']:.3f} ({s['jaccard_top8_chance']:.3f}) "
                             f"| {s['jaccard_top16']:.3f} ({s['jaccard_top16_chance']:.3f}) | "
                             f"{r['step_loss_vs_reference']['max_abs_diff']:.4f} | {r['wall_seconds']} |")
            f = lofA["init_noise_floor"]
            lines += [f"| *{f['what']}* | {f['spearman']:.3f} | {f['jaccard_top8']:.3f} | "
                      f"{f['jaccard_top16']:.3f} | | |", "",
                      f"Reference phase A wall time: {refA['wall_seconds']} s.", ""]
            if "dpo_reference_logp" in lofA:
                d = lofA["dpo_reference_logp"]
                lines += [f"DPO reference log-probs (frozen model), {d['n_sequences']} sequences: max |lofit-ray - "
                          f"reference| = {d['max_abs_diff']} nats (mean |log p| {d['mean_abs']}).", ""]
            lines += ["Step losses (loss + L1 term), first 20 steps:", "", "| step | reference | " +
                      " | ".join(lofA["runs"]) + " |", "|---" * (2 + len(lofA["runs"])) + "|"]
            for i, x in enumerate(refA["step_loss"][:20]):
                lines.append(f"| {i + 1} | {x:.4f} | " + " | ".join(f"{r['step_loss'][i]:.4f}" for r in
                                                                  lofA["runs"].values()) + " |")
            lines.append("")
        if lofv:
            lines += [f"**Phase 2** on the reference's top {sc['k']} heads (reference wall time "
                      f"{refv['wall_seconds']} s):", "",
                      "| lofit-ray run | offset cosine mean (min) | norm ratio lofit/ref (min-max) | "
                      "max abs step-loss diff | wall s |", "|---|---|---|---|---|"]
            for name, r in lofv["runs"].items():
                nr = r["offset_norm_ratio"]
                lines.append(f"| {name} | {r['offset_cosine_mean']:.4f} ({r['offset_cosine_min']:.4f}) | "
                             f"{min(nr):.3f}-{max(nr):.3f} | {r['step_loss_vs_reference']['max_abs_diff']:.4f} | "
                             f"{r['wall_seconds']} |")
            lines += ["", "| step | reference | " + " | ".join(lofv["runs"]) + " |",
                      "|---" * (2 + len(lofv["runs"])) + "|"]
            for i, x in enumerate(refv["step_loss"][:20]):
                lines.append(f"| {i + 1} | {x:.4f} | " + " | ".join(f"{r['step_loss'][i]:.4f}" for r in
                                                                  lofv["runs"].values()) + " |")
            lines.append("")
        if refv and not lofv:
            lines += [f"**Phase 2, reference only** ({refv['wall_seconds']} s; heads "
                      f"{', '.join(f'L{l}H{h}' for l, h in refv['heads'])}). The lofit-ray side did not run. Step losses:",
                      "", " ".join(f"{x:.4f}" for x in refv["step_loss"][:20]), ""]
        if ev:
            cols = [k for k in ("mc1", "mc2", "em", "em_lenient", CUT) if k in ev["metrics"]["base"]]
            lines += [f"**Val scores** (lofit-ray's scorer, n = {ev['n_items']} items, 95% bootstrap intervals):", "",
                      "| adapter | " + " | ".join(cols) + " | wall s |", "|---" * (2 + len(cols)) + "|"]
            for name, m in ev["metrics"].items():
                cells = [f"{m[c]:.3f} [{m[c + '_ci_low']:.3f}, {m[c + '_ci_high']:.3f}]" for c in cols]
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['wall_seconds']} |")
            lines += [""] + _paired_table(ev["paired"], cols)
        if cross:
            cols = [k for k in ("mc1", "mc2", "em", "em_lenient", CUT) if k in cross["metrics"]]
            m = cross["metrics"]
            lines += [f"**The cross**: the reference's phase v on lofit-ray's top {sc['k']} heads (the as_is phase 1; "
                      f"Jaccard with the reference's own top {sc['k']}: {cross['jaccard_vs_reference_heads']:.3f}); "
                      f"{cross['wall_seconds']} s. Val (n = {cross['n_items']}): "
                      + ", ".join(f"{c} {m[c]:.3f} [{m[c + '_ci_low']:.3f}, {m[c + '_ci_high']:.3f}]" for c in cols)
                      + ".", ""] + _paired_table(cross["paired"], cols)
    return "\n".join(lines)


def wall_times(results: Path) -> str:
    """Markdown table of the wall time of every run (seconds) in results/<task>/*.json."""
    lines = ["| task | run | wall s |", "|---|---|---|"]
    for task_dir in sorted(p for p in Path(results).iterdir() if p.is_dir()):
        for stage in ("ref_A", "lofit_A", "ref_v", "lofit_v", "eval", "cross"):
            path = task_dir / f"{stage}.json"
            if not path.exists():
                continue
            r = json.loads(path.read_text())
            if stage == "cross":
                lines.append(f"| {task_dir.name} | reference v on lofit-ray's heads (whole process) | "
                             f"{r['wall_seconds']} |")
                lines.append(f"| {task_dir.name} | val scoring, reference_on_lofit_heads (n={r['metrics']['n']}) | "
                             f"{r['metrics']['wall_seconds']} |")
                continue
            if "wall_seconds" in r:
                lines.append(f"| {task_dir.name} | reference {stage[4:]} (lofit_trainer.py, whole process) | "
                             f"{r['wall_seconds']} |")
            for name, run in r.get("runs", {}).items():
                lines.append(f"| {task_dir.name} | lofit-ray {stage[6:]} {name} (training only) | {run['wall_seconds']} |")
            for name, m in r.get("metrics", {}).items():
                lines.append(f"| {task_dir.name} | val scoring, {name} (n={m['n']}) | {m['wall_seconds']} |")
    return "\n".join(lines)
