"""qrm.metrics: metrics checked against hand-derived values, synthetic-data recovery, warnings, report, probes."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from qrm.metrics import (
    LENGTH_SPEARMAN_WARN,
    PROBE_NAMES,
    fit_temperature,
    load_probes,
    pair_metrics,
    probe_metrics,
    spearman,
    wilson_interval,
)
from qrm.report import write_report


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# Hand example: rejected reward 0, chosen reward = logit(p), so σ(margin) = p exactly (up to rounding).
# Confidences are picked at bin centres (0.55, 0.75, 0.85, 0.95) so no value sits on a bin edge.
#   pair  p(chosen)  margin          conf  correct  len c/r   Δlen
#   1     0.95       +logit(.95)     0.95  1        110/100   +10
#   2     0.95       +logit(.95)     0.95  1         95/100    -5
#   3     0.05       -logit(.95)     0.95  0        120/100   +20
#   4     0.75       +logit(.75)     0.75  1        100/100     0
#   5     0.25       -logit(.75)     0.75  0         90/100   -10
#   6     0.55       +logit(.55)     0.55  1        105/100    +5
#   7     0.5         0 (tie)        0.50  0.5       80/100   -20
#   8     0.85       +logit(.85)     0.85  1        100/100     0
P_CHOSEN = [0.95, 0.95, 0.05, 0.75, 0.25, 0.55, 0.5, 0.85]
HAND_CHOSEN = [logit(p) for p in P_CHOSEN]
HAND_REJECTED = [0.0] * 8
HAND_CLEN = [110, 95, 120, 100, 90, 105, 80, 100]
HAND_RLEN = [100] * 8


@pytest.fixture(scope="module")
def hand() -> dict:
    return pair_metrics(HAND_CHOSEN, HAND_REJECTED, HAND_CLEN, HAND_RLEN, n_bins=5, n_length_buckets=4)


def test_hand_headline_numbers(hand: dict) -> None:
    assert hand["n_pairs"] == 8
    # correct = 1+1+0+1+0+1+0.5+1 = 5.5 of 8
    assert hand["accuracy"] == pytest.approx(0.6875)
    assert hand["n_ties"] == 1
    # Wilson, z = 1.96: p̂ = 0.6875, denom = 1 + z²/8 = 1.480182, centre = (p̂ + z²/16)/denom = 0.626674,
    # half = z·sqrt(p̂(1-p̂)/8 + z²/256)/denom = 0.270917  ->  [0.355755, 0.897592]
    assert hand["accuracy_ci95"] == pytest.approx([0.355755, 0.897592], abs=2e-6)
    # Margins: ±logit(.95) cancel once, ±logit(.75) cancel, so the sum is logit(.95)+logit(.55)+logit(.85)
    # = ln 19 + ln(11/9) + ln(17/3) = ln(3553/27).
    assert hand["mean_margin"] == pytest.approx(math.log(3553 / 27) / 8)
    # BT loss: mean of -ln p(chosen).
    assert hand["bt_loss"] == pytest.approx(-sum(math.log(p) for p in P_CHOSEN) / 8)


def test_hand_calibration_bins_and_ece(hand: dict) -> None:
    # 5 bins of width 0.1 on [0.5, 1]: [.5,.6) [.6,.7) [.7,.8) [.8,.9) [.9,1]
    bins = hand["reliability"]
    assert [b["lo"] for b in bins] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert [b["hi"] for b in bins] == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0])
    # bin0: pairs 6 (.55, 1) and 7 (.50, tie 0.5) -> conf .525, acc .75
    # bin1: empty
    # bin2: pairs 4, 5 (.75, 1 and 0)             -> conf .75,  acc .5
    # bin3: pair 8 (.85, 1)                        -> conf .85,  acc 1
    # bin4: pairs 1, 2, 3 (.95; 1, 1, 0)           -> conf .95,  acc 2/3
    assert [b["n"] for b in bins] == [2, 0, 2, 1, 3]
    assert bins[1]["confidence"] is None and bins[1]["accuracy"] is None
    conf = [bins[i]["confidence"] for i in (0, 2, 3, 4)]
    acc = [bins[i]["accuracy"] for i in (0, 2, 3, 4)]
    assert conf == pytest.approx([0.525, 0.75, 0.85, 0.95])
    assert acc == pytest.approx([0.75, 0.5, 1.0, 2 / 3])
    # ECE = (2·|.75-.525| + 2·|.5-.75| + 1·|1-.85| + 3·|2/3-.95|) / 8 = (.45 + .5 + .15 + .85) / 8 = 0.24375
    assert hand["ece"] == pytest.approx(0.24375)
    # Temperature scaling minimises BT loss, so it can never be worse than T = 1.
    assert hand["bt_loss_after_temperature"] <= hand["bt_loss"] + 1e-12


def test_hand_length_split_and_buckets(hand: dict) -> None:
    # chosen shorter (Δ<0): pairs 2, 5, 7 -> 1, 0, 0.5 ; chosen longer (Δ>0): pairs 1, 3, 6 -> 1, 0, 1
    assert hand["accuracy_when_chosen_shorter"] == {"accuracy": pytest.approx(0.5), "n": 3}
    assert hand["accuracy_when_chosen_longer"] == {"accuracy": pytest.approx(2 / 3), "n": 3}
    assert hand["n_equal_length"] == 2  # pairs 4 and 8
    # Sorted Δ = [-20, -10, -5, 0, 0, 5, 10, 20]; k=4, N=8: edges Δ_(0), Δ_(2), Δ_(4), Δ_(6), max
    # = -20, -5, 0, 10, 20.  [-20,-5): pairs 7, 5 -> .25 ; [-5,0): pair 2 -> 1 ;
    # [0,10): pairs 4, 8, 6 -> 1 ; [10,20]: pairs 1, 3 -> .5
    buckets = hand["accuracy_by_length_bucket"]
    assert [(b["lo"], b["hi"]) for b in buckets] == [(-20, -5), (-5, 0), (0, 10), (10, 20)]
    assert [b["n"] for b in buckets] == [2, 1, 3, 2]
    assert [b["accuracy"] for b in buckets] == pytest.approx([0.25, 1.0, 1.0, 0.5])


def test_spearman_by_hand() -> None:
    # rewards [3,1,5,2,4,0] -> ranks [4,2,6,3,5,1]; lengths [30,10,60,20,50,40] -> ranks [3,1,6,2,5,4]
    # Σd² = 1+1+0+1+0+9 = 12; ρ = 1 - 6·12/(6·35) = 23/35
    m = pair_metrics([3, 1, 5], [2, 4, 0], [30, 10, 60], [20, 50, 40])
    assert m["length_reward_spearman"] == pytest.approx(23 / 35)
    # Ties use average ranks: x ranks [1.5,1.5,3,4], y ranks [1,2,3.5,3.5]; centred x [-1,-1,.5,1.5],
    # y [-1.5,-.5,1,1]; Σxy = 1.5+.5+.5+1.5 = 4, Σx² = 4.5, Σy² = 4.5 -> ρ = 4/4.5
    assert spearman([1, 1, 2, 3], [10, 20, 30, 30]) == pytest.approx(4 / 4.5)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 5, 40), rng.integers(0, 7, 40)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_wilson_textbook_values() -> None:
    # Standard published values (e.g. Newcombe 1998): 0/10 -> [0, 0.2775]; 5/10 -> [0.2366, 0.7634]
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_by_subset_by_hand() -> None:
    m = pair_metrics(
        [2.0, 1.0, 0.0, 3.0, 1.0],
        [1.0, 2.0, 0.0, 1.0, 0.5],
        [10] * 5,
        [10] * 5,
        subsets=["b", "a", "a", "b", "b"],
    )
    # a: pairs 2 (margin -1, 0) and 3 (tie, 0.5) -> acc .25, mean margin -.5
    # b: pairs 1 (+1), 4 (+2), 5 (+.5) -> acc 1, mean margin 3.5/3
    assert list(m["by_subset"]) == ["a", "b"]
    assert m["by_subset"]["a"]["n"] == 2
    assert m["by_subset"]["a"]["accuracy"] == pytest.approx(0.25)
    assert m["by_subset"]["a"]["mean_margin"] == pytest.approx(-0.5)
    assert m["by_subset"]["b"]["n"] == 3
    assert m["by_subset"]["b"]["accuracy"] == pytest.approx(1.0)
    assert m["by_subset"]["b"]["mean_margin"] == pytest.approx(3.5 / 3)
    assert m["n_equal_length"] == 5 and m["accuracy_when_chosen_longer"]["n"] == 0
    json.dumps(m)  # JSON-able, including the None entries


def bt_pairs(n: int, temperature: float, seed: int, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs whose labels follow a Bradley-Terry model P(a beats b) = σ((s_a - s_b) / temperature)."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, scale, size=(n, 2))
    p_first = 1 / (1 + np.exp(-(s[:, 0] - s[:, 1]) / temperature))
    first_wins = rng.random(n) < p_first
    return np.where(first_wins, s[:, 0], s[:, 1]), np.where(first_wins, s[:, 1], s[:, 0])


def test_temperature_recovers_known_scale() -> None:
    chosen, rejected = bt_pairs(40_000, temperature=2.5, seed=0)
    lens = np.full(len(chosen), 50)
    m = pair_metrics(chosen, rejected, lens, lens)
    assert m["temperature"] == pytest.approx(2.5, rel=0.05)
    assert m["temperature_at_bound"] is None
    # Over-confident by 2.5x before, calibrated after.
    assert m["ece"] > 0.1
    assert m["ece_after_temperature"] < 0.02
    # And a model that is calibrated already should get T ≈ 1.
    chosen, rejected = bt_pairs(40_000, temperature=1.0, seed=1)
    assert fit_temperature(chosen - rejected)[0] == pytest.approx(1.0, rel=0.05)


def test_temperature_scale_equivariance_and_minimum() -> None:
    chosen, rejected = bt_pairs(2_000, temperature=1.7, seed=2)
    d = chosen - rejected
    t1, _ = fit_temperature(d)
    t3, _ = fit_temperature(3 * d)
    assert t3 == pytest.approx(3 * t1, rel=1e-4)
    # The fitted T is the minimum of the BT loss of d / T: a dense grid around it finds nothing lower.
    grid = t1 * np.exp(np.linspace(-0.05, 0.05, 201))
    losses = [np.mean(np.logaddexp(0.0, -d / t)) for t in grid]
    assert grid[int(np.argmin(losses))] == pytest.approx(t1, rel=1e-3)
    assert np.mean(np.logaddexp(0.0, -d / t1)) <= min(losses) + 1e-12


def test_temperature_at_bounds() -> None:
    lens = [10] * 60
    separable = pair_metrics([2.0] * 60, [1.0] * 60, lens, lens)
    assert separable["temperature_at_bound"] == "lower"
    assert any("calibration cannot be judged" in w for w in separable["warnings"])
    backwards = pair_metrics([0.0] * 30 + [1.0] * 30, [1.0] * 30 + [0.5] * 30, lens, lens)  # mean margin -0.25
    assert backwards["temperature_at_bound"] == "upper"


def test_bt_loss_is_stable_for_huge_margins() -> None:
    m = pair_metrics([1000.0, -1000.0], [0.0, 0.0], [1, 1], [1, 1])
    # -log σ(1000) ≈ 0, -log σ(-1000) = 1000 (naive log(1 + exp(1000)) overflows to inf)
    assert m["bt_loss"] == pytest.approx(500.0)
    assert math.isfinite(m["ece"]) and math.isfinite(m["temperature"])


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="length mismatch"):
        pair_metrics([1, 2], [0], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        pair_metrics([float("nan")], [0], [1], [1])
    with pytest.raises(ValueError, match="no pairs"):
        pair_metrics([], [], [], [])
    with pytest.raises(ValueError, match="subsets"):
        pair_metrics([1], [0], [1], [1], subsets=["a", "b"])


def has(warnings: list[str], word: str) -> bool:
    return any(word in w for w in warnings)


def test_no_warnings_on_healthy_calibrated_model() -> None:
    chosen, rejected = bt_pairs(600, temperature=1.0, seed=4)
    rng = np.random.default_rng(5)
    m = pair_metrics(chosen, rejected, rng.integers(20, 200, 600), rng.integers(20, 200, 600))
    assert 0.6 < m["accuracy"] < 0.95
    assert m["warnings"] == []


def test_near_chance_and_below_chance_warnings() -> None:
    lens = [10] * 10
    near = pair_metrics([1.0] * 6 + [0.0] * 4, [0.0] * 6 + [1.0] * 4, lens, lens)  # 6/10, CI ~[.31, .83]
    assert has(near["warnings"], "near chance")
    assert has(near["warnings"], "only 10 pairs")
    lens = [10] * 100
    below = pair_metrics([0.0] * 90 + [1.0] * 10, [1.0] * 90 + [0.0] * 10, lens, lens)
    assert has(below["warnings"], "below chance") and not has(below["warnings"], "near chance")


def test_length_warning_from_correlation() -> None:
    rng = np.random.default_rng(6)
    n = 300
    clen, rlen = rng.integers(20, 400, n), rng.integers(20, 400, n)
    noise = rng.normal(0, 0.3, (n, 2))
    m = pair_metrics(0.01 * clen + noise[:, 0], 0.01 * rlen + noise[:, 1], clen, rlen)
    assert m["length_reward_spearman"] > 0.8
    assert has(m["warnings"], "strong length preference") and has(m["warnings"], "favours longer")


def test_length_warning_from_accuracy_gap_alone() -> None:
    # Reward level per pair is unrelated to length (so Spearman ≈ 0), but within every pair the longer response
    # gets +0.5: accuracy is 1 when chosen is longer and 0 when it is shorter.
    rng = np.random.default_rng(7)
    n = 40
    base, length = rng.normal(0, 10, n), rng.integers(10, 1000, n)
    chosen_longer = np.arange(n) < n // 2
    chosen = base + np.where(chosen_longer, 0.5, -0.5)
    clen = np.where(chosen_longer, length + 1, length)
    rlen = np.where(chosen_longer, length, length + 1)
    m = pair_metrics(chosen, base, clen, rlen)
    assert abs(m["length_reward_spearman"]) < LENGTH_SPEARMAN_WARN
    assert m["accuracy_when_chosen_longer"]["accuracy"] == 1.0
    assert m["accuracy_when_chosen_shorter"]["accuracy"] == 0.0
    assert has(m["warnings"], "strong length preference")


def test_high_accuracy_warning_needs_50_pairs() -> None:
    def run(n: int) -> list[str]:
        rng = np.random.default_rng(8)
        chosen, rejected = rng.normal(3, 1, n), rng.normal(-3, 1, n)  # essentially always right
        lens = rng.integers(10, 100, (2, n))
        return pair_metrics(chosen, rejected, lens[0], lens[1])["warnings"]

    assert has(run(50), "leakage")
    assert not has(run(49), "leakage")


def test_tie_warning() -> None:
    lens = [10] * 40
    m = pair_metrics([1.0] * 40, [1.0] * 3 + [0.0] * 37, lens, lens)  # 3/40 = 7.5% ties
    assert m["n_ties"] == 3 and has(m["warnings"], "tie exactly")
    m = pair_metrics([1.0] * 40, [1.0] * 1 + [0.0] * 39, lens, lens)  # 2.5%
    assert not has(m["warnings"], "tie exactly")


def report_inputs() -> tuple:
    chosen, rejected = bt_pairs(300, temperature=2.0, seed=9)
    rng = np.random.default_rng(10)
    return chosen, rejected, rng.integers(20, 300, 300), rng.integers(20, 300, 300), ["hh", "shp", "uf"] * 100


def test_write_report_files_and_images(tmp_path) -> None:
    image = pytest.importorskip("matplotlib.image")
    chosen, rejected, clen, rlen, subsets = report_inputs()
    out = tmp_path / "eval"
    m = write_report(
        out,
        chosen,
        rejected,
        clen,
        rlen,
        subsets,
        title="unit test",
        extra={"model": "tiny", "probes": probe_metrics({"padded": ([1.0, 0.0], [0.0, 1.0])})},
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "length_bias.png",
        "metrics.json",
        "reliability.png",
        "report.md",
        "reward_hist.png",
    ]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    assert on_disk["accuracy"] == pytest.approx(pair_metrics(chosen, rejected, clen, rlen)["accuracy"])
    assert on_disk["extra"]["model"] == "tiny" and set(on_disk["by_subset"]) == {"hh", "shp", "uf"}
    md = (out / "report.md").read_text()
    assert md.startswith("# unit test")
    assert f"{m['accuracy']:.3f}" in md and "reliability.png" in md and "reward_hist.png" in md
    assert "| shp |" in md and "model: tiny" in md
    assert "| padded | 2 | 0.500 |" in md  # probe_metrics output in `extra` becomes a table
    for name in m["plots"]:
        img = image.imread(out / name)
        h, w = img.shape[:2]
        assert h >= 300 and w >= 400, name
        pixels = img[..., :3].reshape(-1, 3)
        assert pixels.std(axis=0).max() > 0.05, f"{name} is (nearly) a single colour"
        assert len(np.unique(pixels, axis=0)) > 50, f"{name} has almost nothing drawn"


def test_write_report_without_matplotlib(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    chosen, rejected, clen, rlen, _ = report_inputs()
    m = write_report(tmp_path, chosen, rejected, clen, rlen)
    assert m["plots"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "report.md"]
    assert "matplotlib is not installed" in (tmp_path / "report.md").read_text()


def test_probes_load_and_are_well_formed() -> None:
    probes = load_probes()
    assert set(probes) == set(PROBE_NAMES)
    for name, rows in probes.items():
        assert len(rows) >= 20, name
        assert len({r["prompt"] for r in rows}) == len(rows), f"{name} repeats a prompt"
        for r in rows:
            assert r["probe"] == name
            assert r["prompt"].strip() and r["chosen"].strip() and r["rejected"].strip()
            assert r["chosen"] != r["rejected"]
    # Shape of each probe: wrong answers are the long ones; padding keeps the answer verbatim.
    for r in probes["concise_vs_wrong_long"]:
        assert len(r["rejected"]) > 2 * len(r["chosen"]), r["prompt"]
    for r in probes["correct_vs_padded"]:
        assert r["chosen"] in r["rejected"] and len(r["rejected"]) > len(r["chosen"]) + 40, r["prompt"]


def test_probe_metrics_by_hand() -> None:
    res = probe_metrics({"a": ([1.0, 2.0, 0.0, 5.0], [0.0, 3.0, 0.0, 1.0]), "b": ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])})
    # a: margins 1, -1, 0, 4 -> 1 + 0 + 0.5 + 1 = 2.5 of 4; mean margin 1
    assert res["a"]["n"] == 4
    assert res["a"]["accuracy"] == pytest.approx(0.625)
    assert res["a"]["mean_margin"] == pytest.approx(1.0)
    assert res["b"] == {"n": 3, "accuracy": 1.0, "accuracy_ci95": list(wilson_interval(3, 3)), "mean_margin": 1.0}
    with pytest.raises(ValueError, match="probe a"):
        probe_metrics({"a": ([1.0], [0.0, 1.0])})
