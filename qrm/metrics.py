"""Numbers of a reward model's rewards: pairwise accuracy with Wilson intervals, calibration (ECE, Bradley-Terry
loss, temperature), Spearman, length bias, per-subset groups, warnings, and the bundled probes. numpy only (scipy,
imported when called, for Spearman and the temperature fit): no torch, no model.

The metrics work on plain reward lists, so they are testable without a model. Callers (`qrm eval`, the end of
`qrm train`, ODIN's per-head evaluation, `qrm merge`'s verification) score each pair's chosen and rejected response
and pass the rewards and response lengths; `qrm.report` writes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np

# Two-sided 95% normal quantile, Φ⁻¹(0.975).
Z95 = 1.959963984540054

# Warning thresholds. Inter-annotator agreement on preference data is usually ~65-75%, so a reward model far above
# that on a real held-out set is more likely seeing leakage or an easy set than being superhumanly good.
HIGH_ACCURACY = 0.95
HIGH_ACCURACY_MIN_PAIRS = 50
LENGTH_SPEARMAN_WARN = 0.3
LENGTH_GAP_WARN = 0.2
LENGTH_GAP_MIN_PAIRS = 10  # each of the shorter/longer groups; smaller groups make the gap mostly noise
ECE_WARN = 0.1
TIE_FRACTION_WARN = 0.05
FEW_PAIRS = 30

PROBE_NAMES = ("concise_vs_wrong_long", "polite_vs_sycophantic", "correct_vs_padded")


# ----------------------------------------------------------------------------------------------------------------
# Small statistics helpers
# ----------------------------------------------------------------------------------------------------------------


def _as_1d(name: str, values: Sequence[float], dtype: type = float) -> np.ndarray:
    arr = np.asarray(values, dtype=dtype).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _pair_scores(margins: np.ndarray) -> np.ndarray:
    """1 where chosen scores higher, 0.5 on an exact tie, 0 where rejected scores higher."""
    return np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0))


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (successes may be fractional, e.g. ties counted as 0.5)."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (`scipy.stats.spearmanr`: Pearson correlation of average ranks).

    Args:
        x (`Sequence[float]`): first variable.
        y (`Sequence[float]`): second variable, as long as `x`.

    Returns the correlation, or None when either side is constant or has fewer than 2 values (scipy would return
    NaN with a warning)."""
    from scipy.stats import spearmanr

    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(xa) != len(ya):
        raise ValueError("x and y must have the same length")
    if len(xa) < 2 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return None
    return float(spearmanr(xa, ya).statistic)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp(-logaddexp(0, -x)) never overflows, unlike 1 / (1 + exp(-x)) for large negative x.
    return np.exp(-np.logaddexp(0.0, -x))


def bt_loss(margins: Sequence[float]) -> float:
    """Mean Bradley-Terry loss −log σ(r_chosen − r_rejected), computed as logaddexp(0, −margin)."""
    m = np.asarray(margins, dtype=float)
    return float(np.mean(np.logaddexp(0.0, -m)))


def calibration(margins: Sequence[float], n_bins: int = 10) -> tuple[float, list[dict[str, Any]]]:
    """Expected calibration error and reliability bins of p = σ(margin), the predicted P(chosen wins).

    Pairs are always oriented chosen-first, so the raw outcome is always 1; we use the symmetric form instead:
    the predicted winner is chosen when p ≥ 0.5, its confidence is max(p, 1−p) ∈ [0.5, 1], and the prediction is
    correct when margin > 0 (an exact tie counts 0.5, matching `accuracy`). Confidence is binned into `n_bins`
    equal-width bins on [0.5, 1]; bin b is [lo_b, hi_b) except the last, which includes 1.0. Then
    ECE = Σ_b (n_b / N) · |acc_b − conf_b| with conf_b the mean confidence and acc_b the mean correctness in bin b.
    Empty bins contribute nothing and report confidence/accuracy as None.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    m = np.asarray(margins, dtype=float)
    conf = _sigmoid(np.abs(m))
    correct = _pair_scores(m)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    # searchsorted on the very edges we report, so a value on an edge lands where the reported bounds say.
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    bins: list[dict[str, Any]] = []
    ece = 0.0
    for b in range(n_bins):
        mask = idx == b
        n_b = int(mask.sum())
        c_b = float(conf[mask].mean()) if n_b else None
        a_b = float(correct[mask].mean()) if n_b else None
        if n_b:
            ece += n_b / len(m) * abs(a_b - c_b)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n_b, "confidence": c_b, "accuracy": a_b})
    return float(ece), bins


def fit_temperature(margins: Sequence[float], max_ratio: float = 1e4) -> tuple[float, str | None]:
    """Temperature T > 0 minimising the mean BT loss of margin / T; returns (T, bound) with bound in
    {None, "lower", "upper"} when the optimum sits on the search bracket.

    The search is over log T in [log(s / max_ratio), log(s · max_ratio)] with s = mean |margin|, so it does not
    depend on the reward scale. Two cases have no finite optimum and return that bracket end: "lower" when no pair
    is ranked wrongly (min margin ≥ 0, so the loss keeps falling as T → 0) and "upper" when the mean margin is ≤ 0
    (the loss is convex in 1/T with slope −mean(margin)/2 at 1/T = 0, so the best fit is a coin flip, T → ∞).
    """
    from scipy.optimize import minimize_scalar

    m = np.asarray(margins, dtype=float)
    scale = float(np.mean(np.abs(m)))
    if scale == 0.0:
        return 1.0, None  # all ties: every temperature gives log 2
    lo, hi = math.log(scale / max_ratio), math.log(scale * max_ratio)
    # Decided analytically: near these ends the loss is flat to machine precision, so the optimiser can't tell.
    if m.min() >= 0:
        return math.exp(lo), "lower"
    if m.mean() <= 0:
        return math.exp(hi), "upper"

    def loss(log_t: float) -> float:
        return float(np.mean(np.logaddexp(0.0, -m * math.exp(-log_t))))

    # The BT loss is convex in 1/T, hence unimodal in log T: Brent's bounded search finds the one minimum.
    log_t = float(minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-7}).x)
    return math.exp(log_t), None


# ----------------------------------------------------------------------------------------------------------------
# Pair metrics
# ----------------------------------------------------------------------------------------------------------------


def _group(scores: np.ndarray, margins: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    n = int(mask.sum())
    if n == 0:
        return {"n": 0, "accuracy": None, "accuracy_ci95": None, "mean_margin": None}
    acc = float(scores[mask].mean())
    return {
        "n": n,
        "accuracy": acc,
        "accuracy_ci95": list(wilson_interval(acc * n, n)),
        "mean_margin": float(margins[mask].mean()),
    }


def length_buckets(length_diff: Sequence[float], n_buckets: int = 5) -> np.ndarray:
    """Quantile bucket edges of the chosen − rejected length difference.

    With the differences sorted as d_(0) ≤ … ≤ d_(N−1), edge i is d_(⌊i·N/k⌋) for i < k and the last edge is the
    maximum; repeated edges (many equal differences) are merged, so there may be fewer than k buckets. Bucket i is
    [edge_i, edge_{i+1}) except the last, which is closed. Every edge is a data value and each bucket holds its
    lower edge, so no bucket is empty.
    """
    d = np.sort(np.asarray(length_diff, dtype=float))
    n = len(d)
    k = max(1, min(n_buckets, n))
    edges = [d[(i * n) // k] for i in range(k)] + [d[-1]]
    return np.unique(np.asarray(edges, dtype=float))


def _check_pairs(
    chosen: Sequence[float],
    rejected: Sequence[float],
    chosen_len: Sequence[int],
    rejected_len: Sequence[int],
    subsets: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four inputs of `pair_metrics` as finite 1-d arrays of one length (ValueError naming what is wrong)."""
    rc, rr = _as_1d("chosen", chosen), _as_1d("rejected", rejected)
    lc, lr = _as_1d("chosen_len", chosen_len), _as_1d("rejected_len", rejected_len)
    n = len(rc)
    if n == 0:
        raise ValueError("no pairs to evaluate")
    if not (len(rr) == len(lc) == len(lr) == n):
        raise ValueError(
            f"length mismatch: {n} chosen, {len(rr)} rejected, {len(lc)} chosen_len, {len(lr)} rejected_len"
        )
    if subsets is not None and len(subsets) != n:
        raise ValueError(f"subsets has {len(subsets)} entries for {n} pairs")
    return rc, rr, lc, lr


def _accuracy_by_length_bucket(
    scores: np.ndarray, margins: np.ndarray, diff: np.ndarray, n_length_buckets: int
) -> list[dict[str, Any]]:
    """Accuracy per quantile bucket of the length difference (see `length_buckets`)."""
    edges = length_buckets(diff, n_length_buckets)
    n_buckets = max(len(edges) - 1, 1)
    bucket_idx = np.clip(np.searchsorted(edges, diff, side="right") - 1, 0, n_buckets - 1)
    by_bucket = []
    for b in range(n_buckets):
        g = _group(scores, margins, bucket_idx == b)
        lo = float(edges[b])
        hi = float(edges[b + 1]) if len(edges) > 1 else lo
        by_bucket.append({"lo": lo, "hi": hi, "n": g["n"], "accuracy": g["accuracy"]})
    return by_bucket


def pair_metrics(
    chosen: Sequence[float],
    rejected: Sequence[float],
    chosen_len: Sequence[int],
    rejected_len: Sequence[int],
    subsets: Sequence[str] | None = None,
    n_bins: int = 10,
    *,
    n_length_buckets: int = 5,
) -> dict[str, Any]:
    """All pairwise metrics of a reward model on preference pairs, as a JSON-able dict.

    Args:
        chosen (`Sequence[float]`): reward of the preferred response of each pair.
        rejected (`Sequence[float]`): reward of the dispreferred response of each pair.
        chosen_len (`Sequence[int]`): length of each chosen response (any unit, e.g. tokens, the same for both).
        rejected_len (`Sequence[int]`): length of each rejected response.
        subsets (`Sequence[str]`, *optional*, defaults to `None`): a label per pair (e.g. source dataset); adds
            `by_subset`.
        n_bins (`int`, *optional*, defaults to `10`): confidence bins for ECE (see `calibration`).
        n_length_buckets (`int`, *optional*, defaults to `5`): quantile buckets of the length difference (see
            `length_buckets`).

    Accuracy is the fraction of pairs with r_chosen > r_rejected, where an exact tie counts as 0.5 (a tie is a coin
    flip). `accuracy_ci95` is the Wilson score interval. `bt_loss` is mean −log σ(r_chosen − r_rejected).
    `temperature` is the T minimising the BT loss of margin / T (T > 1: over-confident, T < 1: under-confident).
    `length_reward_spearman` correlates reward with length over all 2N responses. `accuracy_by_length_bucket`
    buckets pairs by chosen_len − rejected_len (quantile edges; positive means chosen is longer).
    `accuracy_when_chosen_shorter/longer` split pairs by the sign of that difference; equal lengths are excluded
    from both and counted in `n_equal_length`.
    """
    rc, rr, lc, lr = _check_pairs(chosen, rejected, chosen_len, rejected_len, subsets)
    n = len(rc)

    margins = rc - rr
    scores = _pair_scores(margins)
    acc = float(scores.mean())
    ece, reliability = calibration(margins, n_bins)
    temperature, t_bound = fit_temperature(margins)
    ece_t, reliability_t = calibration(margins / temperature, n_bins)

    diff = lc - lr
    by_bucket = _accuracy_by_length_bucket(scores, margins, diff, n_length_buckets)

    shorter, longer = _group(scores, margins, diff < 0), _group(scores, margins, diff > 0)
    rho = spearman(np.r_[rc, rr], np.r_[lc, lr])

    by_subset: dict[str, Any] = {}
    if subsets is not None:
        labels = np.asarray([str(s) for s in subsets])
        for name in sorted(set(labels.tolist())):
            by_subset[name] = _group(scores, margins, labels == name)

    metrics: dict[str, Any] = {
        "n_pairs": n,
        "accuracy": acc,
        "accuracy_ci95": list(wilson_interval(acc * n, n)),
        "n_ties": int((margins == 0).sum()),
        "mean_margin": float(margins.mean()),
        "bt_loss": bt_loss(margins),
        "mean_chosen_reward": float(rc.mean()),
        "mean_rejected_reward": float(rr.mean()),
        "ece": ece,
        "n_bins": n_bins,
        "reliability": reliability,
        "temperature": temperature,
        "temperature_at_bound": t_bound,
        "bt_loss_after_temperature": bt_loss(margins / temperature),
        "ece_after_temperature": ece_t,
        "reliability_after_temperature": reliability_t,
        "length_reward_spearman": rho,
        "length_bucket_definition": "quantile buckets of chosen_len - rejected_len; [lo, hi), last bucket closed",
        "accuracy_by_length_bucket": by_bucket,
        "accuracy_when_chosen_shorter": {"accuracy": shorter["accuracy"], "n": shorter["n"]},
        "accuracy_when_chosen_longer": {"accuracy": longer["accuracy"], "n": longer["n"]},
        "n_equal_length": int((diff == 0).sum()),
        "by_subset": by_subset,
    }
    metrics["warnings"] = _warnings(metrics)
    return metrics


def _pairs(n: int) -> str:
    return f"{n} pair" if n == 1 else f"{n} pairs"


def _warnings(m: dict[str, Any]) -> list[str]:
    out: list[str] = []
    n, acc = m["n_pairs"], m["accuracy"]
    lo, hi = m["accuracy_ci95"]
    if hi < 0.5:
        out.append(
            f"below chance: accuracy {acc:.3f} (95% CI {lo:.3f}-{hi:.3f}) is significantly under 0.5; "
            "chosen and rejected may be swapped in the data or the reward sign flipped"
        )
    elif lo <= 0.5:
        out.append(
            f"near chance: accuracy {acc:.3f} (95% CI {lo:.3f}-{hi:.3f}) cannot be told apart from 0.5 on {_pairs(n)}"
        )
    if n < FEW_PAIRS:
        out.append(f"only {_pairs(n)}: every number here is noisy")
    if acc > HIGH_ACCURACY and n >= HIGH_ACCURACY_MIN_PAIRS:
        out.append(
            f"accuracy {acc:.3f} is higher than preference data usually supports (inter-annotator agreement "
            "~65-75%): check for leakage between train and eval, or an easy set"
        )
    if m["n_ties"] / n > TIE_FRACTION_WARN:
        out.append(
            f"{m['n_ties']} of {n} pairs tie exactly: the reward head may be constant or saturated "
            "(ties count as 0.5 in accuracy)"
        )

    rho = m["length_reward_spearman"]
    short, long_ = m["accuracy_when_chosen_shorter"], m["accuracy_when_chosen_longer"]
    gap = None
    if min(short["n"], long_["n"]) >= LENGTH_GAP_MIN_PAIRS:
        gap = long_["accuracy"] - short["accuracy"]
    reasons = []
    if rho is not None and abs(rho) > LENGTH_SPEARMAN_WARN:
        reasons.append(f"reward-length Spearman {rho:+.2f}")
    if gap is not None and abs(gap) > LENGTH_GAP_WARN:
        reasons.append(
            f"accuracy {long_['accuracy']:.2f} when chosen is longer vs {short['accuracy']:.2f} when shorter"
        )
    if reasons:
        # Direction from the correlation when it triggered, else from the accuracy gap.
        rho_fired = rho is not None and abs(rho) > LENGTH_SPEARMAN_WARN
        which = "longer" if (rho if rho_fired else gap) > 0 else "shorter"
        out.append(
            f"strong length preference ({'; '.join(reasons)}): the model may reward length rather than quality "
            f"(it favours {which} responses)"
        )

    if m["ece"] > ECE_WARN:
        # A temperature on the search bracket is not a fit, so don't recommend it.
        fix = (
            f"; dividing margins by temperature {m['temperature']:.3g} gives ECE {m['ece_after_temperature']:.3f}"
            if m["temperature_at_bound"] is None
            else ""
        )
        out.append(f"poorly calibrated: ECE {m['ece']:.3f}{fix}")
    if m["temperature_at_bound"] == "lower":
        out.append(
            "no pair is ranked wrongly, so the BT loss keeps falling as the temperature shrinks and no temperature "
            "fits: calibration cannot be judged on this set"
        )
    elif m["temperature_at_bound"] == "upper":
        out.append("mean margin is not positive, so the best-fitting temperature is unbounded (no usable signal)")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------------------------


def load_probes() -> dict[str, list[dict[str, str]]]:
    """The adversarial probe sets shipped in qrm/probes/, by probe name (the file stem).

    Each row has prompt, chosen (the known-better answer), rejected and probe.
    """
    root = resources.files("qrm") / "probes"
    out: dict[str, list[dict[str, str]]] = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".jsonl"):
            continue
        name = entry.name[: -len(".jsonl")]
        rows = [json.loads(line) for line in entry.read_text(encoding="utf-8").splitlines() if line.strip()]
        for i, row in enumerate(rows):
            missing = {"prompt", "chosen", "rejected", "probe"} - set(row)
            if missing:
                raise ValueError(f"probe {name} row {i} lacks {sorted(missing)}")
        out[name] = rows
    return out


def probe_metrics(results: dict[str, tuple[Sequence[float], Sequence[float]]]) -> dict[str, dict[str, Any]]:
    """Per-probe accuracy (ties count 0.5), Wilson 95% interval, mean margin and n.

    `results` maps probe name to (chosen rewards, rejected rewards) in the probe's row order.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, (rc, rr) in results.items():
        c, r = _as_1d(f"{name} chosen", rc), _as_1d(f"{name} rejected", rr)
        if len(c) != len(r):
            raise ValueError(f"probe {name}: {len(c)} chosen vs {len(r)} rejected rewards")
        if len(c) == 0:
            out[name] = {"n": 0, "accuracy": None, "accuracy_ci95": None, "mean_margin": None}
            continue
        margins = c - r
        out[name] = _group(_pair_scores(margins), margins, np.ones(len(c), dtype=bool))
    return out
