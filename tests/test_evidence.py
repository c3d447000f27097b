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


def test_a_seed_going_the_other_way_makes_a_significant_gap_a_tie():
    assert evidence.seed_counts({0: 0.3, 1: 0.4, 2: 0.4}, {0: 0.3, 1: 0.1, 2: 0.5}) == (1, 1, 1)
    assert evidence.seed_counts({0: 0.3}, {0: 0.1}) is None  # one shared seed says nothing about the spread
    assert evidence.seed_counts({None: 0.3}, {None: 0.1, 0: 0.2}) is None
    strong = {"diff": 0.2, "p_value": 0.0002}
    assert evidence.verdict(strong, seeds=(3, 0, 0)) == "ahead"
    assert evidence.verdict(strong, seeds=(2, 1, 0)) == "ahead"  # an equal seed is not a reversal
    assert evidence.verdict(strong, seeds=(2, 0, 1)) == "tie"
    assert evidence.verdict({"diff": -0.2, "p_value": 0.0002}, seeds=(1, 0, 2)) == "tie"
    assert evidence.verdict({"diff": -0.2, "p_value": 0.0002}, seeds=(0, 1, 2)) == "behind"


def test_the_record_tally_holds_a_win_that_one_random_draw_reverses_to_a_tie(tmp_path):
    """The case the paper protocol met on Gemma-3 / CLUTRR (K = 2): two random-heads draws score 0 and one
    beats LoFiT. Over the seed-averaged items LoFiT is far ahead (p < 0.05), but the draws' spread covers it."""
    from lofit_ray.experiments.record import render_comparisons

    n = 100
    lofit_em = {0: 0.25, 1: 0.24, 2: 0.25}
    def cells_for(random_em: dict) -> list[dict]:
        cells = []
        for method, ems in (("lofit", lofit_em), ("random_heads", random_em)):
            for seed, em in ems.items():
                items = f"items/{method}_{seed}_{random_em[0]}.jsonl"
                evidence.write_rows(tmp_path / items, [{"id": str(i), "em": float(i < round(em * n))}
                                                      for i in range(n)])
                cells.append({"model": "m", "task": "clutrr", "method": method, "k": 2, "seed": seed,
                              "metrics": {"em": em}, "items": items})
        return cells

    reversed_by_one_draw = "\n".join(render_comparisons(cells_for({0: 0.31, 1: 0.0, 2: 0.0}), ["m"], ["clutrr"],
                                                        tmp_path))
    row = next(line for line in reversed_by_one_draw.splitlines() if line.startswith("| m |"))
    assert "+0.143 (p=0.0002; seeds 2/0/1)" in row  # item by item it looks decisive
    assert "random_heads 0 / 1 / 0" in reversed_by_one_draw
    every_draw_behind = "\n".join(render_comparisons(cells_for({0: 0.15, 1: 0.0, 2: 0.0}), ["m"], ["clutrr"],
                                                     tmp_path))
    assert "seeds 3/0/0" in every_draw_behind and "random_heads 1 / 0 / 0" in every_draw_behind


def test_the_search_report_calls_a_win_a_tie_when_a_random_control_beats_the_champion():
    from lofit_ray.report import report_text

    strong = {"diff": 0.12, "ci_low": 0.06, "ci_high": 0.18, "p_value": 0.0002, "n": 100}
    def text(each: list[float]) -> str:
        return report_text("m", "reg", "1", {"k": 2, "split": "val", "n": 100, "intervals": {}, "controls": 3,
                                             "random_seed_sd": {"em": 0.1}, "champion": {"em": 0.30, "n": 100},
                                             "vs_random": {"em": strong}, "random_each": {"em": each}})
    reversed_by_one = [line for line in text([0.31, 0.0, 0.22]).splitlines() if "champion - random heads" in line]
    assert reversed_by_one[0].endswith("tie (a control is above the champion: the random draws cover the gap)")
    assert text([0.29, 0.0, 0.22]).rstrip().endswith("p=0.0002  ahead")
