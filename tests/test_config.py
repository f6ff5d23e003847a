"""Recipe parsing: YAML defaults, CLI overrides, unknown keys, and the resolved config written to disk."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from qrm.config import parse_recipe, to_dict, write_provenance
from qrm.errors import RecipeError

DEMO = ROOT / "recipes" / "demo" / "minilm_hh_helpful.yaml"


def test_recipe_then_overrides():
    m, lo, d, t = parse_recipe(
        ["--recipe", str(DEMO), "--learning_rate", "1.0e-5", "--lora_r", "4", "--dataset_format", "auto"]
    )
    assert m.model_name_or_path.startswith("pkg:") and m.load_in_4bit
    assert t.learning_rate == 1.0e-5 and lo.lora_r == 4 and d.dataset_format == "auto"
    assert t.max_length == 192 and d.max_pairs == 1500  # from the file


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text(DEMO.read_text() + "\nlearning_rat: 1.0e-4\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: unknown key\(s\) learning_rat"):
        parse_recipe(["--recipe", str(bad)])


def test_unknown_flag_on_command_line():
    with pytest.raises(RecipeError, match="--lora_rank"):
        parse_recipe(["--recipe", str(DEMO), "--lora_rank", "8"])


def test_bad_values_are_named(tmp_path):
    with pytest.raises(RecipeError, match="dataset_format='tsv'"):
        parse_recipe(["--recipe", str(DEMO), "--dataset_format", "tsv"])
    with pytest.raises(RecipeError, match="recipe file not found"):
        parse_recipe(["--recipe", str(tmp_path / "missing.yaml")])


def test_resolved_recipe_reparses_and_redacts_tokens(tmp_path):
    cfgs = parse_recipe(["--recipe", str(DEMO), "--hub_token", "hf_SECRETSECRET", "--lora_r", "8"])
    write_provenance(tmp_path, to_dict(*cfgs))
    text = (tmp_path / "qrm_recipe.yaml").read_text()
    assert "hf_SECRETSECRET" not in text
    again = parse_recipe(["--recipe", str(tmp_path / "qrm_recipe.yaml")])
    assert again[1].lora_r == 8 and again[3].learning_rate == cfgs[3].learning_rate
    versions = json.loads((tmp_path / "qrm_versions.json").read_text())["versions"]
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes"} <= set(versions)


def test_errors_blame_the_recipe_line_or_the_flag_and_overrides_are_logged(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(DEMO.read_text() + "\nlora_dropout: 1.5\n")
    line = len(recipe.read_text().splitlines())
    with pytest.raises(RecipeError, match=rf"r\.yaml:{line}: lora_dropout=1\.5 must be < 1"):
        parse_recipe(["--recipe", str(recipe)])
    with pytest.raises(RecipeError, match=r"^command line --lora_dropout: lora_dropout=-0\.5 must be >= 0"):
        parse_recipe(["--recipe", str(recipe), "--lora_dropout", "-0.5"])
    assert f"lora_dropout: the command line value overrides 1.5 from {recipe}:{line}" in capsys.readouterr().err
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: per_device_train_batch_size: invalid int value: 'x'"):
        recipe.write_text(DEMO.read_text().replace("per_device_train_batch_size: 8", "per_device_train_batch_size: x"))
        parse_recipe(["--recipe", str(recipe)])


def test_no_silent_zero_epoch_run_and_no_abbreviated_flags():
    with pytest.raises(RecipeError, match=r"num_train_epochs=-1\.0 must be > 0"):
        parse_recipe(["--recipe", str(DEMO), "--num_train_epochs", "-1"])
    with pytest.raises(RecipeError, match="unknown field"):
        parse_recipe(["--recipe", str(DEMO), "--learning_rat", "1e-4"])


def test_eval_split_from_the_command_line_wins_over_the_recipe(tmp_path, capsys):
    """`--eval_fraction` over a recipe's `eval_dataset` (and `--eval_dataset` over a recipe's `eval_fraction`) wins
    with a one-line notice, as every other flag does; both from one place is still an error naming both."""
    text = DEMO.read_text()
    line = next(i for i, x in enumerate(text.splitlines(), start=1) if x.startswith("eval_dataset:"))
    capsys.readouterr()
    _, _, d, _ = parse_recipe(["--recipe", str(DEMO), "--eval_fraction", "0.2"])
    assert d.eval_fraction == 0.2 and d.eval_dataset is None
    notices = [x for x in capsys.readouterr().err.splitlines() if "eval_" in x]
    assert notices == [
        f"[qrm] eval_fraction: the command line value 0.2 overrides eval_dataset "
        f"'data/hh-rlhf-helpful/helpful-base.test.jsonl' from {DEMO}:{line} (eval pairs are held out of dataset instead)"
    ]
    with_fraction = tmp_path / "with_fraction.yaml"
    with_fraction.write_text(text.replace("eval_dataset:", "# eval_dataset:") + "\neval_fraction: 0.1\n")
    _, _, d, _ = parse_recipe(["--recipe", str(with_fraction), "--eval_dataset", "e.jsonl"])
    assert d.eval_fraction == 0.0 and d.eval_dataset == "e.jsonl"
    assert "eval_dataset: the command line value overrides eval_fraction 0.1" in capsys.readouterr().err
    both = tmp_path / "both.yaml"
    both.write_text(text + "\neval_fraction: 0.3\n")
    with pytest.raises(RecipeError, match=rf"eval_dataset \({both}:{line}\) and eval_fraction \({both}:"):
        parse_recipe(["--recipe", str(both)])
    with pytest.raises(RecipeError, match=r"command line --eval_dataset\) and eval_fraction \(command line"):
        parse_recipe(["--recipe", str(DEMO), "--eval_dataset", "e.jsonl", "--eval_fraction", "0.2"])
