"""benchmarks/length_debias.py: the table from finished runs (differences from plain computed, not typed) and the
rule that a finished run is kept and an unfinished one moved aside, never deleted. Training is not run here."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import length_debias as bench


def _finished(run: Path, acc: float, short: float, spearman: float) -> None:
    probes = {"concise": {"accuracy": 0.5, "n": 24}, "padded": {"accuracy": 0.75, "n": 24}}
    metrics = {
        "accuracy": acc,
        "accuracy_ci95": [acc - 0.04, acc + 0.04],
        "length_reward_spearman": spearman,
        "accuracy_when_chosen_shorter": {"accuracy": short, "n": 218},
        "accuracy_when_chosen_longer": {"accuracy": 0.8, "n": 300},
        "ece": 0.05,
        "extra": {"probes": probes},
    }
    (run / "eval-probes").mkdir(parents=True)
    (run / "eval-probes" / "metrics.json").write_text(json.dumps(metrics))
    (run / "metrics.json").write_text(json.dumps({"train_runtime_s": 144.0}))


def test_table_compares_each_method_with_plain(tmp_path: Path, capsys) -> None:
    _finished(tmp_path / "helpful" / "none", 0.639, 0.344, 0.351)
    _finished(tmp_path / "helpful" / "erase", 0.583, 0.509, 0.021)
    assert bench.main(["--sets", "helpful", "--out", str(tmp_path), "--table-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and "| concise | padded | train s |" in lines[0]
    erase = lines[3].split(" | ")
    assert erase[1:3] == ["erase", "0.583 (-5.6) [0.543, 0.623]"] and erase[3] == "+0.021"
    assert erase[4] == "0.509 (+16.5) (n=218)" and erase[7:9] == ["12/24", "18/24"]
    assert (tmp_path / "summary.md").read_text().splitlines() == lines


def test_unfinished_runs_are_moved_aside_and_finished_ones_kept(tmp_path: Path, monkeypatch) -> None:
    _finished(tmp_path / "helpful" / "none", 0.639, 0.344, 0.351)
    (tmp_path / "helpful" / "erase").mkdir(parents=True)
    (tmp_path / "helpful" / "erase" / "partial.txt").write_text("a crashed run")
    launched = []
    monkeypatch.setattr(bench, "_launch", lambda todo, out, jobs: launched.extend(todo) or [])
    bench.main(["--sets", "helpful", "--out", str(tmp_path)])
    assert launched == [("helpful", "erase"), ("helpful", "odin")]
    moved = list((tmp_path / "helpful").glob("erase.old-*/partial.txt"))
    assert len(moved) == 1 and (tmp_path / "helpful" / "none" / "eval-probes" / "metrics.json").is_file()
