"""`qrm eval`'s written output: metrics.json, report.md and the PNG plots (reliability, length bias, reward
histograms), from the metrics `qrm.metrics.pair_metrics` computes. matplotlib is optional: without it the report
says so and no PNG is drawn."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .files import METRICS_FILE, REPORT_FILE
from .metrics import pair_metrics


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _fmt_group(g: dict[str, Any]) -> str:
    return f"{_fmt(g['accuracy'])} (n={g['n']})"


def write_report(
    out_dir: str | Path,
    chosen: Sequence[float],
    rejected: Sequence[float],
    chosen_len: Sequence[int],
    rejected_len: Sequence[int],
    subsets: Sequence[str] | None = None,
    title: str = "qrm eval",
    extra: dict[str, Any] | None = None,
    *,
    heads: dict[str, Any] | None = None,
    rewardbench: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute `qrm.metrics.pair_metrics` and write metrics.json, report.md and (with matplotlib) reliability.png,
    length_bias.png and reward_hist.png into `out_dir`.

    Args:
        out_dir (`str` or `Path`): where the files go (created if missing).
        chosen, rejected, chosen_len, rejected_len, subsets: as for `qrm.metrics.pair_metrics`.
        title (`str`, *optional*, defaults to `"qrm eval"`): heading of the report and the plots.
        extra (`dict`, *optional*, defaults to `None`): stored under "extra" (probe results get a table).
        heads (`dict`, *optional*, defaults to `None`): ODIN's per-head metrics (`qrm.evaluate.eval_heads`).
        rewardbench (`dict`, *optional*, defaults to `None`): `qrm.rewardbench.rewardbench_scores` output.

    Returns the metrics as written to metrics.json, with the written plot file names under "plots"."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = pair_metrics(chosen, rejected, chosen_len, rejected_len, subsets)
    rc, rr = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    lc, lr = np.asarray(chosen_len, dtype=float), np.asarray(rejected_len, dtype=float)

    plots: list[str] = []
    plot_note = None
    try:
        import matplotlib  # noqa: F401  (imported first so a blocked/missing matplotlib fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        plot_note = "matplotlib is not installed, so no plots were drawn (`pip install qrm[plots]`)."
    else:
        # Figure + FigureCanvasAgg directly: the Agg backend without touching pyplot's global state.
        def new_fig(w: float, h: float) -> Any:
            fig = Figure(figsize=(w, h), dpi=100)
            FigureCanvasAgg(fig)
            return fig

        _plot_reliability(new_fig(6.5, 5.5), out / "reliability.png", metrics, title)
        _plot_length_bias(new_fig(13, 5), out / "length_bias.png", metrics, rc, rr, lc, lr, title)
        _plot_reward_hist(new_fig(7, 5), out / "reward_hist.png", rc, rr, title)
        plots = ["reliability.png", "length_bias.png", "reward_hist.png"]

    if extra is not None:
        metrics["extra"] = extra
    metrics["plots"] = plots
    for key, value in (("heads", heads), ("rewardbench", rewardbench)):
        if value is not None:
            metrics[key] = value
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str) + "\n", encoding="utf-8")
    (out / REPORT_FILE).write_text(_report_md(metrics, title, plot_note), encoding="utf-8")
    return metrics


def _report_md(m: dict[str, Any], title: str, plot_note: str | None) -> str:
    lo, hi = m["accuracy_ci95"]
    rows = [
        ("pairs", str(m["n_pairs"])),
        ("accuracy (ties count 0.5)", f"{_fmt(m['accuracy'])} (95% CI {_fmt(lo)}-{_fmt(hi)})"),
        ("mean margin (chosen - rejected)", _fmt(m["mean_margin"])),
        ("Bradley-Terry loss", _fmt(m["bt_loss"])),
        (f"ECE ({m['n_bins']} bins)", _fmt(m["ece"])),
        ("temperature", f"{m['temperature']:.4g}"),
        ("ECE after temperature", _fmt(m["ece_after_temperature"])),
        ("reward-length Spearman", _fmt(m["length_reward_spearman"])),
        ("accuracy when chosen is shorter", _fmt_group(m["accuracy_when_chosen_shorter"])),
        ("accuracy when chosen is longer", _fmt_group(m["accuracy_when_chosen_longer"])),
        ("pairs of equal length", str(m["n_equal_length"])),
    ]
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Warnings", ""]
    lines += [f"- {w}" for w in m["warnings"]] or ["None."]

    if m["by_subset"]:
        lines += ["", "## By subset", "", "| subset | n | accuracy | mean margin |", "|---|---|---|---|"]
        for name, g in m["by_subset"].items():
            lines.append(f"| {name} | {g['n']} | {_fmt(g['accuracy'])} | {_fmt(g['mean_margin'])} |")

    lines += [
        "",
        "## Accuracy by length difference",
        "",
        "Buckets of chosen length minus rejected length (quantile edges; positive: chosen is longer).",
        "",
        "| bucket | n | accuracy |",
        "|---|---|---|",
    ]
    for i, b in enumerate(m["accuracy_by_length_bucket"]):
        closing = "]" if i == len(m["accuracy_by_length_bucket"]) - 1 else ")"
        lines.append(f"| [{b['lo']:g}, {b['hi']:g}{closing} | {b['n']} | {_fmt(b['accuracy'])} |")

    lines += ["", "## Plots", ""]
    if plot_note:
        lines.append(plot_note)
    else:
        lines += [
            "- [reliability diagram](reliability.png)",
            "- [length bias](length_bias.png)",
            "- [reward histograms](reward_hist.png)",
            "",
            "![reliability](reliability.png)",
            "",
            "![length bias](length_bias.png)",
            "",
            "![reward histograms](reward_hist.png)",
        ]

    if m.get("heads"):
        lines += heads_report_lines(m["heads"])
    if m.get("rewardbench"):
        from .rewardbench import report_lines

        lines += report_lines(m["rewardbench"])
    extra = dict(m.get("extra") or {})
    probes = extra.get("probes")
    # probe_metrics output gets a table of its own; anything else in `extra` is listed as is.
    if isinstance(probes, dict) and probes and all(isinstance(g, dict) and "accuracy" in g for g in probes.values()):
        lines += ["", "## Probes", "", "| probe | n | accuracy | 95% CI |", "|---|---|---|---|"]
        for name, g in probes.items():
            ci = g.get("accuracy_ci95")
            ci_s = f"{_fmt(ci[0])}-{_fmt(ci[1])}" if ci else "n/a"
            lines.append(f"| {name} | {g.get('n', 'n/a')} | {_fmt(g['accuracy'])} | {ci_s} |")
        del extra["probes"]
    if extra:
        lines += ["", "## Details", ""]
        nested = {k: v for k, v in extra.items() if isinstance(v, (dict, list))}
        lines += [f"- {k}: {_fmt(v, 4)}" for k, v in extra.items() if k not in nested]
        if nested:
            lines += ["", "```json", json.dumps(nested, indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def write_rewardbench_report(out_dir: str | Path, rb: dict[str, Any], extra: dict[str, Any], source: str) -> dict:
    """metrics.json and report.md of a `qrm eval` run that scored a RewardBench file and no pairs.

    Args:
        out_dir (`str` or `Path`): where the two files go (created if missing).
        rb (`dict`): `qrm.rewardbench.rewardbench_scores` output.
        extra (`dict`): stored beside it under "extra" (the model, probe results).
        source (`str`): the RewardBench file, for the report's title.

    Returns the metrics as written: `{"rewardbench": rb, "extra": extra}`."""
    from .rewardbench import report_lines

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"rewardbench": rb, "extra": extra}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    (out / REPORT_FILE).write_text("\n".join([f"# qrm eval: {source}", *report_lines(rb)]) + "\n")
    return metrics


def _plot_reliability(fig: Any, path: Path, m: dict[str, Any], title: str) -> None:
    ax = fig.add_subplot()
    bins = [b for b in m["reliability"] if b["n"]]
    width = (m["reliability"][0]["hi"] - m["reliability"][0]["lo"]) if m["reliability"] else 0.05
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    ax.bar(
        centers,
        [b["accuracy"] for b in bins],
        width=width * 0.9,
        color="tab:blue",
        alpha=0.7,
        edgecolor="black",
        label=f"fraction correct per bin (ECE {m['ece']:.3f})",
    )
    ax.plot(
        [b["confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        "o",
        color="tab:blue",
        markeredgecolor="black",
        label="model: bin (mean confidence, accuracy)",
    )
    after = [b for b in m["reliability_after_temperature"] if b["n"]]
    ax.plot(
        [b["confidence"] for b in after],
        [b["accuracy"] for b in after],
        "s-",
        color="tab:orange",
        label=f"after temperature T={m['temperature']:.3g} (ECE {m['ece_after_temperature']:.3f})",
    )
    ax.plot([0.5, 1.0], [0.5, 1.0], "k--", label="perfect calibration")
    for c, b in zip(centers, bins, strict=True):
        ax.annotate(
            f"n={b['n']}", (c, b["accuracy"]), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7
        )
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.08)
    ax.set_xlabel("confidence max(p, 1-p), p = sigmoid(r_chosen - r_rejected)")
    ax.set_ylabel("fraction of pairs ranked correctly")
    ax.set_title(f"{title}: reliability ({m['n_pairs']} pairs)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _plot_length_bias(
    fig: Any,
    path: Path,
    m: dict[str, Any],
    rc: np.ndarray,
    rr: np.ndarray,
    lc: np.ndarray,
    lr: np.ndarray,
    title: str,
) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    buckets = m["accuracy_by_length_bucket"]
    x = np.arange(len(buckets))
    ax1.bar(x, [b["accuracy"] or 0.0 for b in buckets], color="tab:green", alpha=0.8, label="accuracy in bucket")
    ax1.axhline(0.5, color="gray", linestyle=":", label="chance")
    ax1.axhline(m["accuracy"], color="black", linestyle="--", label=f"overall ({m['accuracy']:.3f})")
    labels = []
    for i, b in enumerate(buckets):
        closing = "]" if i == len(buckets) - 1 else ")"
        labels.append(f"[{b['lo']:g}, {b['hi']:g}{closing}\nn={b['n']}")
    ax1.set_xticks(x)
    ax1.set_xticklabels(labels, fontsize=8)
    ax1.set_ylim(0.0, 1.05)
    ax1.set_xlabel("chosen length - rejected length (bucket)")
    ax1.set_ylabel("accuracy")
    ax1.set_title("accuracy by length difference")
    ax1.legend(loc="lower right", fontsize=8)

    # Subsample big sets so the scatter stays readable and the PNG small; fixed seed keeps reports reproducible.
    n = len(rc)
    keep = np.arange(n)
    if n > 2500:
        keep = np.sort(np.random.default_rng(0).choice(n, 2500, replace=False))
    ax2.scatter(lr[keep], rr[keep], s=8, alpha=0.5, color="tab:red", label="rejected")
    ax2.scatter(lc[keep], rc[keep], s=8, alpha=0.5, color="tab:blue", label="chosen")
    rho = m["length_reward_spearman"]
    shown = f", {len(keep)} of {n} pairs shown" if len(keep) < n else ""
    ax2.set_title(f"reward vs length (Spearman {_fmt(rho)}{shown})")
    ax2.set_xlabel("response length")
    ax2.set_ylabel("reward")
    ax2.legend(loc="best", fontsize=8)
    fig.suptitle(f"{title}: length bias")
    fig.tight_layout()
    fig.savefig(path)


def _plot_reward_hist(fig: Any, path: Path, rc: np.ndarray, rr: np.ndarray, title: str) -> None:
    ax = fig.add_subplot()
    # √(responses) bins, clamped: enough shape for big sets without a comb of empty bins for small ones.
    edges = np.histogram_bin_edges(np.r_[rc, rr], bins=int(min(50, max(10, math.sqrt(2 * len(rc))))))
    ax.hist(rc, bins=edges, alpha=0.55, color="tab:blue", label=f"chosen (mean {rc.mean():.3f})")
    ax.hist(rr, bins=edges, alpha=0.55, color="tab:red", label=f"rejected (mean {rr.mean():.3f})")
    ax.axvline(float(rc.mean()), color="tab:blue", linestyle="--")
    ax.axvline(float(rr.mean()), color="tab:red", linestyle="--")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("reward")
    ax.set_ylabel("number of responses")
    ax.set_title(f"{title}: reward distributions")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)


def heads_report_lines(heads: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown section for report.md comparing the ODIN heads."""
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines = ["", "## ODIN heads", "", "The model (and every export) scores with the quality head; the length head and"]
    lines[-1] += " the sum (what the Bradley-Terry loss was applied to) are shown for comparison."
    lines += ["", "| head | accuracy | reward-length Spearman | acc. chosen shorter | acc. chosen longer |"]
    lines += ["|---|---|---|---|---|"]
    for name, m in heads.items():
        short, long_ = m["accuracy_when_chosen_shorter"], m["accuracy_when_chosen_longer"]
        lines.append(
            f"| {name} | {f(m['accuracy'])} | {f(m['length_reward_spearman'])} | {f(short['accuracy'])} "
            f"(n={short['n']}) | {f(long_['accuracy'])} (n={long_['n']}) |"
        )
    return lines
