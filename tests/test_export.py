"""`qrm merge` / `qrm score`: exact and base merges of a tiny trained 4-bit reward model, verified in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import MINILM, hh_rows, write_jsonl

from qrm.errors import ExportError, VerificationError
from qrm.export import DEFAULT_MIN_AGREEMENT, merge
from qrm.export import main as merge_main
from qrm.score import main as score_main
from qrm.verify import verification_report

ROOT = Path(__file__).resolve().parents[1]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@pytest.fixture(scope="module")
def adapter(rm_adapter: Path) -> Path:
    """The tiny Llama (saved as LlamaForCausalLM, as real checkpoints are) trained 10 steps in 4-bit NF4."""
    return rm_adapter


@pytest.fixture(scope="module")
def exact(rm_export: dict) -> dict:
    """The exact merge in float32: the export that should reproduce the 4-bit model to float rounding."""
    return rm_export


@pytest.fixture(scope="module")
def verify_rows(adapter: Path) -> list[dict]:
    return [json.loads(line) for line in (adapter / "verify_pairs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def short_rows(adapter: Path, verify_rows: list[dict]) -> list[dict]:
    """Verification pairs that fit max_length (128) untruncated: qrm cuts long prompts from the left, a plain
    pipeline does not, so only these can be compared with plain-text scoring."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    fits = lambda r, k: len(tok(r["prompt"] + r[k])["input_ids"]) <= 100  # noqa: E731
    rows = [r for r in verify_rows if fits(r, "chosen") and fits(r, "rejected")][:4]
    assert len(rows) >= 2
    return rows


def _fresh_python(code: str) -> dict:
    """Run `code` in a new interpreter (nothing cached from this one) and return the JSON it prints last."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_exact_merge_reproduces_the_4bit_model(exact: dict, verify_rows: list[dict]) -> None:
    v = exact["verification"]
    assert v["passed"] and v["problems"] == []
    assert v["pairs"] == len(verify_rows) >= 10
    assert v["pairwise_agreement"] == 1.0
    assert v["max_abs_delta"] < 1e-4
    assert v["spearman"] > 0.9999
    assert v["flipped_pairs"] == []
    assert v["min_agreement"] == DEFAULT_MIN_AGREEMENT["exact"] == 1.0
    # The reference was recomputed in the parent; it must agree with what training stored for the same pairs.
    assert v["stored_rewards_max_abs_delta"] < 1e-5
    # Fresh-process load: the head and every other weight came from the checkpoint, none newly initialized.
    assert v["load_report"]["missing_keys"] == [] and v["load_report"]["unexpected_keys"] == []
    assert v["export_runtime"] == {"dtypes": ["float32"], "device": "cpu", "autocast": None}
    assert v["token_id_mismatches"] == 0
    assert v["plain_text_id_mismatches"] == 0
    # The LoRA update really is in there: the trained model differs from the untrained base.
    assert len({round(r["chosen_reward"], 4) for r in verify_rows}) > 3


@pytest.mark.slow
def test_base_merge_shows_the_quantization_gap(adapter: Path, exact: dict, verify_rows: list[dict]) -> None:
    """Merging into the original weights changes rewards (the adapter learned on dequantized NF4 weights)."""
    # Verified on the same pairs given as a user file in another format (HH-style full texts, "implicit").
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in verify_rows]
    data = write_jsonl(adapter.parent / "verify_implicit.jsonl", implicit)
    base = merge(
        adapter, adapter.parent / "base-fp32", method="base", dtype="float32", verify_data=data, min_agreement=0
    )
    vb, ve = base["verification"], exact["verification"]
    assert vb["passed"] and vb["min_agreement"] == 0.0
    assert vb["pairs_source"] == str(data) and vb["pairs"] == ve["pairs"]
    assert "stored_rewards_max_abs_delta" not in vb  # a user file has no stored rewards to cross-check
    assert vb["max_abs_delta"] > 1e-3
    assert vb["max_abs_delta"] > 100 * ve["max_abs_delta"]
    assert vb["mean_abs_delta"] > 100 * ve["mean_abs_delta"]
    assert vb["spearman"] < 1.0
    card = (Path(base["out_dir"]) / "README.md").read_text()
    assert "--method base" in card and f"{vb['max_abs_delta']:.3g}" in card
    assert DEFAULT_MIN_AGREEMENT["base"] == 0.9


@pytest.mark.slow
def test_export_layout_for_serving(exact: dict, adapter: Path) -> None:
    """What vLLM and transformers rely on: *ForSequenceClassification, 1 label, pad token, safetensors, score.weight."""
    from safetensors import safe_open

    from qrm.config import read_recipe

    out = Path(exact["out_dir"])
    names = {p.name for p in out.rglob("*")}
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)], names
    assert "training_args.bin" not in names
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "verification.json"} <= names
    assert {"qrm_recipe.yaml", "qrm_versions.json", "metrics.json", "qrm_export.json"} <= names
    assert "verify_pairs.jsonl" not in names  # held-out data stays with the adapter
    config = json.loads((out / "config.json").read_text())
    # The base was saved as a real checkpoint is (LlamaForCausalLM); the export names the class it holds.
    base = read_recipe(adapter)[0].model_name_or_path
    assert json.loads((Path(base) / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["problem_type"] == "regression"
    assert len(config["id2label"]) == 1
    assert config["pad_token_id"] is not None and config["pad_token_id"] != config["eos_token_id"]
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("score.weight").get_shape() == [1, config["hidden_size"]]
        assert f.metadata() == {"format": "pt"}
    assert not any("lora" in k or "base_layer" in k or "absmax" in k for k in keys)
    # The recipe is still re-readable for the model fields, and the card carries the verification figures.
    assert read_recipe(out)[0].model_name_or_path == read_recipe(adapter)[0].model_name_or_path
    v = json.loads((out / "verification.json").read_text())
    card = (out / "README.md").read_text()
    assert f"{v['pairwise_agreement']:.4f}" in card
    assert f"{v['max_abs_delta']:.3g}" in card
    assert f"{v['spearman']:.6f}" in card
    assert "problem_type: regression" in card and "RewardModel.from_pretrained" in card
    assert "function_to_apply" not in card and "qrm.reward_function" in card
    assert json.loads((out / "qrm_export.json").read_text())["tokenizer"]["chat_template"] == "qrm-plain"
    assert (out / "chat_template.jinja").read_text().startswith("{{- bos_token -}}")  # training put BOS first
    # Which clients take a decoder export, with the measured agreement (docs/serving.md has the full table).
    assert "### Clients (decoder export)" in card and "`get_llm_for_sequence_regression`" in card
    assert "0 in fp32, 2.5e-3 in its default bf16" in card
    assert '"eval_accuracy"' in card  # metrics.json
    assert "bnb_4bit_compute_dtype: float32" in card  # the recipe


CONVERSATIONS = [
    (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "assistant", "content": "4"}],
    ),
    (
        [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another, please?"},
        ],
        [{"role": "assistant", "content": "Red, like a tomato."}],
    ),
]


def _pipeline_check(out: str, rows: list[list[str]]) -> dict:
    """In a fresh process: the export through `pipeline` with DEFAULT settings and through `qrm.RewardModel`, and its
    tokenizer's chat template against qrm's rendering of the same conversations."""
    return _fresh_python(
        f"""
        import json
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
        from qrm import RewardModel
        from qrm.data import render_messages, special_tokens
        rows, convs = {json.dumps(rows)}, {json.dumps(CONVERSATIONS)}
        _, info = AutoModelForSequenceClassification.from_pretrained({out!r}, output_loading_info=True)
        pipe = pipeline("text-classification", model={out!r})
        rm = RewardModel.from_pretrained({out!r})
        tok = AutoTokenizer.from_pretrained({out!r})
        plain = AutoTokenizer.from_pretrained({out!r}); plain.chat_template = None  # qrm's layout without a template
        print(json.dumps({{
            "missing": sorted(info["missing_keys"]),
            "pipe": [pipe(p + r)[0]["score"] for p, r in rows],
            "rm": rm.score_batch([p for p, _ in rows], [r for _, r in rows]),
            "specials": special_tokens(tok),
            "ids_equal": [rm.tokenize([p], [r])[0] == pipe.tokenizer(p + r)["input_ids"] for p, r in rows],
            "template": [tok.apply_chat_template(p + c, tokenize=False) for p, c in convs],
            "template_gen": [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p, _ in convs],
            "qrm": [render_messages(p + c, plain, False) for p, c in convs],
            "qrm_gen": [render_messages(p, plain, True) for p, _ in convs],
            "rm_conv": rm.score_batch([p for p, _ in convs], [c for _, c in convs]),
            # The template writes BOS (for add_special_tokens=False clients); pipeline adds its own: drop the text copy.
            "pipe_conv": [
                pipe(tok.apply_chat_template(p + c, tokenize=False).removeprefix(tok.bos_token or ""))[0]["score"]
                for p, c in convs
            ],
            "bos": tok.bos_token,
            # A policy prompted with the generation prompt answers " text": re-rendered, that turn is the same text.
            "symmetric": [
                tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) + " " + c[0]["content"]
                == tok.apply_chat_template(p + [{{**c[0], "content": " " + c[0]["content"]}}], tokenize=False)
                == tok.apply_chat_template(p + c, tokenize=False)
                for p, c in convs
            ],
        }}))
        """
    )


@pytest.mark.slow
def test_export_in_fresh_process_pipeline_equals_reward_model(exact: dict, short_rows: list[dict]) -> None:
    """`pipeline("text-classification")` with its defaults on prompt + response gives the raw reward: the
    RewardModel score and the trained model's reward; the shipped chat template renders what training rendered."""
    rows = short_rows
    result = _pipeline_check(exact["out_dir"], [[r["prompt"], r["chosen"]] for r in rows])
    assert result["missing"] == []
    assert all(result["ids_equal"])
    assert result["specials"][1] != []  # the tokenizer now closes with EOS, as qrm did in training
    for p, r, row in zip(result["pipe"], result["rm"], rows, strict=True):
        assert abs(p - r) < 1e-5
        assert abs(p - row["chosen_reward"]) < 1e-4
    assert any(r < 0 or r > 1 for r in result["pipe"])  # raw rewards, not sigmoid probabilities
    # The tokenizer puts BOS first, so the shipped template renders it before qrm's plain layout.
    bos = result["bos"]
    assert bos == "<s>" and result["specials"][0] != []
    assert result["template"] == [bos + t for t in result["qrm"]]
    assert result["template_gen"] == [bos + t for t in result["qrm_gen"]]
    assert result["qrm_gen"][0] == "\n\nSystem: Be brief.\n\nHuman: What is 2 + 2?\n\nAssistant:"
    assert all(result["symmetric"])
    for p, r in zip(result["pipe_conv"], result["rm_conv"], strict=True):
        assert abs(p - r) < 1e-5


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """all-MiniLM-L6-v2 (saved as BertModel, as published) trained 3 steps in 4 bit and merged exactly in float32."""
    from qrm.config import parse_recipe
    from qrm.train import train

    tmp = tmp_path_factory.mktemp("minilm")
    data = write_jsonl(tmp / "pairs.jsonl", hh_rows(24))
    out = tmp / "adapter"
    flags = {
        "model_name_or_path": MINILM, "dataset": data, "dataset_format": "implicit", "eval_fraction": 0.25,
        "bnb_4bit_compute_dtype": "float32", "bf16": "false", "output_dir": out, "max_steps": 3,
        "per_device_train_batch_size": 6, "learning_rate": 5e-3, "max_length": 96, "lora_r": 4, "lora_alpha": 8,
        "gradient_checkpointing": "false", "save_strategy": "no", "eval_strategy": "no", "report_to": "none",
        "disable_tqdm": "true",
    }  # fmt: skip
    train(*parse_recipe([x for k, v in flags.items() for x in (f"--{k}", str(v))]))
    return merge(out, tmp / "export", method="exact", dtype="float32")


@pytest.mark.slow
def test_minilm_export_describes_itself_and_pipeline_gives_raw_reward(minilm_export: dict) -> None:
    from qrm.source import resolve_path

    out = Path(minilm_export["out_dir"])
    assert json.loads((Path(resolve_path(MINILM)) / "config.json").read_text())["architectures"] == ["BertModel"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    assert minilm_export["verification"]["passed"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    rows = [json.loads(line) for line in (out.parent / "adapter" / "verify_pairs.jsonl").read_text().splitlines()]
    rows = [r for r in rows if len(tok(r["prompt"] + r["chosen"])["input_ids"]) <= 90][:3]  # untruncated by qrm
    assert rows
    result = _pipeline_check(str(out), [[r["prompt"], r["chosen"]] for r in rows])
    assert result["missing"] == [] and all(result["ids_equal"])
    for p, r, row in zip(result["pipe"], result["rm"], rows, strict=True):
        assert abs(p - r) < 1e-5
        assert abs(p - row["chosen_reward"]) < 1e-4
    assert result["bos"] is None  # [CLS] is no BOS: the template writes none, and renders what training rendered
    card = (out / "README.md").read_text()
    assert "### Clients (encoder export)" in card and "no: it reads `model.score`, which an encoder lacks" in card
    assert result["template"] == result["qrm"] and result["template_gen"] == result["qrm_gen"]
    assert all(result["symmetric"])
    for p, r in zip(result["pipe_conv"], result["rm_conv"], strict=True):
        assert abs(p - r) < 1e-5


@pytest.mark.slow
def test_bfloat16_sharded_export(adapter: Path, exact: dict) -> None:
    """bf16 storage (scored in plain bf16, as served) drifts more than fp32; small shards load all the same."""
    bf = merge(adapter, adapter.parent / "exact-bf16", dtype="bfloat16", max_shard_size="100KB", min_agreement=0.0)
    out = Path(bf["out_dir"])
    v = bf["verification"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    assert v["load_report"]["missing_keys"] == []
    assert v["export_runtime"]["dtypes"] == ["bfloat16"] and v["export_runtime"]["autocast"] is None
    assert exact["verification"]["max_abs_delta"] < v["max_abs_delta"] < 0.05
    assert v["spearman"] > 0.99


@pytest.mark.slow
def test_adapter_only_export_loads_with_plain_peft(adapter: Path, short_rows: list[dict]) -> None:
    from safetensors import safe_open

    res = merge(adapter, adapter.parent / "adapter-only", adapter_only=True)
    out = Path(res["out_dir"])
    v = res["verification"]
    assert v["kind"] == "adapter" and v["passed"]
    assert v["max_abs_delta"] < 1e-5 and v["pairwise_agreement"] == 1.0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md"} <= names
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        assert any(k.endswith("score.weight") for k in f.keys())
    card = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "llm_int8_skip_modules=['score']" in card
    # The card's recipe, followed outside qrm's loader, reproduces what training stored.
    from qrm.reward_model import score_ids
    from qrm.verify import load_adapter_plain

    model, tok = load_adapter_plain(out)
    rows = short_rows
    batch = [tok(r["prompt"] + r["chosen"])["input_ids"] for r in rows]
    for got, row in zip(score_ids(model, batch, tok.pad_token_id), rows, strict=True):
        assert abs(got - row["chosen_reward"]) < 1e-4


@pytest.mark.slow
def test_score_cli_rows_and_pairs(
    exact: dict, adapter: Path, short_rows: list[dict], verify_rows: list[dict], tmp_path: Path
) -> None:
    rows = short_rows
    responses = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": r["prompt"], "response": r["chosen"]} for r in rows])
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    pairs.insert(2, {"prompt": "same", "chosen": "identical", "rejected": "identical"})  # not a usable pair
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)

    out = tmp_path / "rewards.jsonl"
    assert (
        score_main(["--model", exact["out_dir"], "--data", str(responses), "--out", str(out), "--batch-size", "2"]) == 0
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["row"] for line in lines] == list(range(1, len(rows) + 1))
    for line, row in zip(lines, rows, strict=True):
        assert abs(line["reward"] - row["chosen_reward"]) < 1e-4

    out = tmp_path / "pair_rewards.jsonl"
    assert score_main(["--model", exact["out_dir"], "--data", str(pairs_file), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(pairs) and [line["row"] for line in lines] == list(range(1, len(pairs) + 1))
    assert lines[2]["skipped"] and lines[2]["chosen_reward"] is None
    scored = [line for line in lines if "skipped" not in line]
    for line, row in zip(scored, rows, strict=True):
        assert abs(line["chosen_reward"] - row["chosen_reward"]) < 1e-4
        assert abs(line["rejected_reward"] - row["rejected_reward"]) < 1e-4

    # The Python API on every held-out pair, long prompts included: pairs are truncated as training truncated them.
    from qrm import RewardModel

    c, r = RewardModel.from_pretrained(exact["out_dir"]).score_pairs(
        [x["prompt"] for x in verify_rows], [x["chosen"] for x in verify_rows], [x["rejected"] for x in verify_rows]
    )
    assert max(abs(a - x["chosen_reward"]) for a, x in zip(c, verify_rows, strict=True)) < 1e-4
    assert max(abs(a - x["rejected_reward"]) for a, x in zip(r, verify_rows, strict=True)) < 1e-4
    # The adapter dir scores through the same API, with the 4-bit base rebuilt from the recipe.
    got = RewardModel.from_pretrained(adapter).score_batch([rows[0]["prompt"]], [rows[0]["rejected"]])
    assert abs(got[0] - rows[0]["rejected_reward"]) < 1e-5


def test_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fake = tmp_path / "adapter"
    fake.mkdir()
    (fake / "adapter_config.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        merge(fake, out)
    assert merge_main(["--adapter", str(fake), "--out", str(out)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="overwrite the adapter"):
        merge(fake, fake, force=True)
    with pytest.raises(ExportError, match="inside the adapter"):
        merge(fake, fake / "export", force=True)
    with pytest.raises(ExportError, match="method"):
        merge(fake, tmp_path / "new", method="requantize")


def test_verification_report_fails_on_flips_and_missing_keys() -> None:
    child = {
        "chosen": [1.0, 0.2, 0.5],
        "rejected": [0.0, 0.3, 0.6],
        "token_id_mismatches": 0,
        "load_report": {"missing_keys": ["score.weight"]},
    }
    r = verification_report("exact", "bfloat16", "x", "ref", [1.0, 0.4, 0.5], [0.0, 0.3, 0.6], None, child, 1.0)
    assert r["pairwise_agreement"] == pytest.approx(2 / 3)
    assert r["flipped_pairs"] == [
        {"pair": 1, "reference_margin": pytest.approx(0.1), "export_margin": pytest.approx(-0.1)}
    ]
    assert r["max_abs_delta"] == pytest.approx(0.2)
    assert not r["passed"] and len(r["problems"]) == 2


def test_merge_main_exit_code_on_failed_verification(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import qrm.export as export

    def failing(*args, **kwargs):
        raise VerificationError("verification failed: pairwise agreement 0.9 < min_agreement 1.0", {})

    monkeypatch.setattr(export, "merge", failing)
    assert merge_main(["--adapter", "a", "--out", "b"]) == 1
    assert "agreement 0.9" in capsys.readouterr().err
