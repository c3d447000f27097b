"""lm-eval hooks of the lofit_truthfulqa_* tasks: the items come from lofit-ray's own TruthfulQA reader, so
lm-eval scores exactly the items `lofit-ray eval` scores; the model, tokenization and log-likelihoods are lm-eval's.

--metadata keys: split (a split name or file, default "val"), data_dir, fold (default 0), limit.
"""
import datasets
import numpy as np


def load_split(split="val", data_dir=None, fold=0, limit=None, **_):
    from lofit_ray.tasks import get_task

    items = get_task("truthfulqa", data_dir=data_dir, fold=int(fold)).eval_items(split, limit=limit)
    rows = []
    for item in items:
        incorrect = [c for c, label in zip(item.choices, item.labels) if not label]
        rows.append({"question": item.question, "prefix": item.prefix, "choices": item.choices, "labels": item.labels,
                     "mc1_choices": [item.choices[item.best_index()]] + incorrect})
    return datasets.DatasetDict({"eval": datasets.Dataset.from_list(rows)})


def mc2(doc, results):
    """The share of probability mass on the correct answers, among all answers."""
    loglik = np.array([r[0] for r in results])
    probs = np.exp(loglik - loglik.max())
    labels = np.array(doc["labels"])
    return {"acc": float(probs[labels == 1].sum() / probs.sum())}
