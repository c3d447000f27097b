"""The bootstrap behind every interval and p-value the service prints (lofit_ray.evidence)."""
import numpy as np
import pytest

from lofit_ray import evidence


def test_paired_interval_covers_the_true_difference_at_about_the_nominal_rate():
    """400 synthetic pairs of evaluations of 150 items (binary scores, like MC1 or EM, correlated within an
    item as two runs of one model are) with a known true difference: the 95% interval holds it ~95% of the time."""
    rng = np.random.default_rng(0)
    n, replicates, covered = 150, 400, 0
    p_item = rng.beta(2, 2, size=5000)  # a population of items of varied difficulty
    true_diff = 0.05
    for r in range(replicates):
        p = rng.choice(p_item, size=n)
        u = rng.random(n)  # shared noise: the two runs agree on most items
        a = (u < np.clip(p + true_diff, 0, 1)).astype(float)
        b = (u < p).astype(float)
        # the population difference is E[clip(p + d) - p], slightly below d near 1
        truth = float(np.mean(np.clip(p_item + true_diff, 0, 1) - p_item))
        ci = evidence.paired(a, b, resamples=2000, seed=r)
        covered += ci["ci_low"] <= truth <= ci["ci_high"]
    rate = covered / replicates
    assert 0.91 <= rate <= 0.98, rate  # binomial sd at 400 replicates is 0.011


def test_interval_of_a_mean_covers_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    covered = sum(evidence.interval(x := rng.normal(0.3, 1.0, 80), resamples=2000, seed=i)["ci_low"] <= 0.3
                  <= evidence.interval(x, resamples=2000, seed=i)["ci_high"] for i in range(300))
    assert 0.91 <= covered / 300 <= 0.98


def test_p_values_are_uniform_enough_under_no_difference_and_small_under_a_real_one():
    rng = np.random.default_rng(2)
    null_ps = [evidence.paired(rng.normal(0, 1, 100), rng.normal(0, 1, 100), resamples=2000, seed=i)["p_value"]
               for i in range(300)]
    assert 0.02 <= np.mean(np.array(null_ps) < 0.05) <= 0.09
    strong = evidence.paired(rng.normal(0.5, 1, 200), rng.normal(0, 1, 200))
    assert strong["p_value"] < 0.001 and evidence.verdict(strong) == "ahead"
    assert evidence.verdict(evidence.paired(np.zeros(50), np.ones(50))) == "behind"
    same = evidence.paired(np.ones(20), np.ones(20))
    assert same["p_value"] == 1.0 and same["diff"] == 0.0 and evidence.verdict(same) == "tie"


def test_bootstrap_is_seeded_and_uses_10k_resamples_by_default():
    x = np.random.default_rng(3).random(400)
    assert evidence.interval(x) == evidence.interval(x)
    assert evidence.interval(x, seed=1) != evidence.interval(x, seed=2)
    assert evidence.RESAMPLES >= 10_000


def test_rows_pair_only_when_they_scored_the_same_items(tmp_path):
    a = [{"id": f"{i}-x", "mc1": float(i % 2), "mc2": 0.5} for i in range(6)]
    b = list(reversed([{"id": f"{i}-x", "mc1": 0.0, "mc2": 0.25} for i in range(6)]))
    result = evidence.compare_rows(a, b)  # pairs by id, whatever the order
    assert result["mc1"]["diff"] == pytest.approx(0.5) and result["mc2"]["diff"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="did not score the same items"):
        evidence.compare_rows(a, b[:5])
    with pytest.raises(ValueError, match="did not score the same items"):
        evidence.compare_rows(a, [{**r, "id": r["id"] + "y"} for r in b])
    path = evidence.write_rows(tmp_path / "r.jsonl", a)
    assert evidence.read_rows(path) == a
    assert evidence.mean_rows([a, a])[3] == {"id": "3-x", "mc1": 1.0, "mc2": 0.5}
    with pytest.raises(FileNotFoundError, match="lofit-ray eval --out"):
        evidence.read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="non-empty"):
        evidence.interval([])
