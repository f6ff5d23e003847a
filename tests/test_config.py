"""Recipe parsing: YAML defaults, CLI overrides, unknown keys, and the resolved config written to disk."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from qrm.config import RecipeError, parse_recipe, to_dict, write_provenance

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
