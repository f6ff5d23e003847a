"""The model card (README.md) of a reward model: one card for `qrm merge` exports and for `qrm push`.

The card says what the directory holds, how it was verified (when `qrm merge` verified it), how to use it with qrm,
transformers (+ PEFT for an adapter) and TRL, and shows qrm's provenance files. The YAML metadata and the text
are assembled with huggingface_hub's `ModelCard` / `ModelCardData`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .files import (
    ADAPTER_CONFIG,
    EXPORT_INFO_FILE,
    LENGTH_ERASE_FILE,
    METRICS_FILE,
    MODEL_CONFIG,
    RECIPE_FILE,
    VERIFICATION_FILE,
    VERSIONS_FILE,
    dir_kind,
)

PROVENANCE_SECTIONS = (
    ("Training recipe", RECIPE_FILE, "yaml"),
    ("Training metrics", METRICS_FILE, "json"),
    ("Length debiasing (length_debias: erase, the score head edit)", LENGTH_ERASE_FILE, "json"),
    ("Library versions", VERSIONS_FILE, "json"),
)
# Only a Hub id is valid `base_model` metadata; a local or pkg: path would fail the Hub's YAML check.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")
_EXAMPLE = '"\\n\\nHuman: What is 2 + 2?\\n\\nAssistant:" + " 4"'  # prompt + response, HH layout


def load_instructions(margs: Any, skip_modules: list[str] | None) -> dict[str, Any]:
    """How to rebuild the training-time base of an adapter with plain transformers + PEFT.

    Args:
        margs (`ModelArguments`):
            The model fields of the training recipe.
        skip_modules (`list[str]`, *optional*):
            The modules the 4-bit load must leave unquantized (the score head): PEFT's saved full-precision head
            cannot be loaded into a quantized one.

    Returns:
        `dict`: `base_model`, `revision`, `quantization_config` (the `BitsAndBytesConfig` fields, or None),
        `dtype` and `autocast` (the 16-bit compute dtype training autocast to, or None); stored in
        `qrm_export.json` and read by the card and by the verification child."""
    quant = None
    if margs.load_in_4bit:
        quant = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": margs.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": margs.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": margs.bnb_4bit_compute_dtype,
            "bnb_4bit_quant_storage": margs.bnb_4bit_quant_storage,
            "llm_int8_skip_modules": list(skip_modules or []),
        }
    autocast = None
    if margs.load_in_4bit and margs.bnb_4bit_compute_dtype in ("bfloat16", "float16"):
        autocast = margs.bnb_4bit_compute_dtype
    return {
        "base_model": margs.model_name_or_path,
        "revision": margs.model_revision,
        "quantization_config": quant,
        "dtype": "float32",
        "autocast": autocast,
    }


def model_card(
    folder: str | os.PathLike,
    *,
    title: str | None = None,
    repo_id: str | None = None,
    provenance: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
) -> str:
    """The README.md model card of an export (`qrm merge`) or an adapter dir (`qrm train`).

    Args:
        folder (`str` or `os.PathLike`):
            The directory the card describes; its `qrm_recipe.yaml`, `metrics.json` and `qrm_versions.json` are
            shown when present.
        title (`str`, *optional*, defaults to `None`):
            The card's heading; defaults to `repo_id`, else the directory's name.
        repo_id (`str`, *optional*, defaults to `None`):
            The Hub repo the card is pushed to: the transformers snippets then load from it.
        provenance (`dict`, *optional*, defaults to `None`):
            What `qrm merge` did (its `qrm_export.json`); read from `folder`, else derived from the directory's
            own files (adapter config, recipe, `config.json`).
        report (`dict`, *optional*, defaults to `None`):
            The verification figures (`verification.json`); read from `folder` when present, else the card has no
            verification section.

    Returns:
        `str`: the card, YAML metadata (`base_model` only when it is a Hub id) followed by the Markdown text.
        Raises `ValueError` when `folder` holds neither an adapter nor a model config."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    provenance = provenance or _read_json(folder / EXPORT_INFO_FILE) or _dir_provenance(folder)
    report = report or _read_json(folder / VERIFICATION_FILE)
    adapter = provenance["kind"] == "adapter"
    base = provenance.get("base_model")
    data = ModelCardData(
        base_model=base if base and _HUB_ID.match(base) and not Path(base).exists() else None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-classification",
        tags=["reward-model", "qrm", "trl"] + (["lora", "qlora"] if adapter else []),
    )
    where = f'"{repo_id}"' if repo_id else None
    parts = [
        f"# {title or repo_id or folder.resolve().name}\n",
        "A reward model trained with qrm (QLoRA on a 4-bit backbone + TRL `RewardTrainer`):"
        " it maps a prompt and a response to one scalar reward; higher means preferred.\n",
        f"This repo holds {_what(provenance)}.\n",
        _facts(provenance),
        *([_verification(report)] if report else []),
        "## Usage\n",
        _tokenizer_note(provenance, report),
        _usage(provenance, where),
        *_provenance_sections(folder),
    ]
    return str(ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(parts)))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _dir_provenance(folder: Path) -> dict[str, Any]:
    """A provenance record for a directory `qrm merge` did not write: a training output dir or a foreign export.

    Read from the directory's own files only (no qrm.config import: `qrm push` stays light), so the base is loaded
    unquantized in the snippet, with a pointer to `qrm merge --adapter-only` for the exact 4-bit load."""
    import yaml

    kind = dir_kind(folder)
    if kind is None:
        raise ValueError(f"{folder} is neither an adapter dir ({ADAPTER_CONFIG}) nor an export dir ({MODEL_CONFIG})")
    adapter_cfg = (_read_json(folder / ADAPTER_CONFIG) or {}) if kind == "adapter" else {}
    config = _read_json(folder / MODEL_CONFIG) or {}
    try:
        recipe = yaml.safe_load((folder / RECIPE_FILE).read_text()) if (folder / RECIPE_FILE).is_file() else {}
    except (OSError, yaml.YAMLError):
        recipe = {}
    recipe = recipe if isinstance(recipe, dict) else {}
    base = adapter_cfg.get("base_model_name_or_path") or config.get("_name_or_path") or recipe.get("model_name_or_path")
    info: dict[str, Any] = {
        "kind": "adapter" if kind == "adapter" else "merged",
        "method": None,
        "base_model": str(base) if base else None,
        "base_revision": recipe.get("model_revision"),
        "architecture": (config.get("architectures") or [None])[0],
        "max_length": recipe.get("max_length"),
        "tokenizer": None,
    }
    if kind == "adapter":
        info["load"] = {"base_model": base, "revision": recipe.get("model_revision") or "main"}
        info["load"] |= {"quantization_config": None, "dtype": "float32", "autocast": None, "exact": False}
    return info


def _what(provenance: dict[str, Any]) -> str:
    if provenance["kind"] == "adapter":
        return "the LoRA adapter and the trained score head, to load on the 4-bit base model they were trained with"
    if provenance.get("method") is None:
        return "a standalone `AutoModelForSequenceClassification` (adapter merged into the base model)"
    return (
        f"a standalone `{provenance['architecture']}` (num_labels=1): the adapter merged "
        + (
            "into the dequantized NF4 weights it was trained against (`--method exact`)"
            if provenance["method"] == "exact"
            else "into the original full-precision base weights (`--method base`)"
        )
        + f", stored in {provenance['dtype']}, safetensors only"
    )


def _facts(provenance: dict[str, Any]) -> str:
    revision = provenance.get("base_revision")
    lines = [
        f"- Base model: `{provenance.get('base_model') or 'unknown'}`"
        + (f" (revision `{revision}`)" if revision else "")
    ]
    if provenance.get("architecture"):
        lines.append(f"- Architecture: `{provenance['architecture']}`")
    if provenance.get("max_length"):
        lines.append(f"- Max length in training: {provenance['max_length']} tokens (prompt cut from the left)")
    if provenance.get("adapter_sha256"):
        lines.append(f"- Adapter sha256: `{provenance['adapter_sha256']}`")
    return "\n".join(lines) + "\n"


def _verification(report: dict[str, Any]) -> str:
    verdict = "passed" if report["passed"] else "FAILED: " + "; ".join(report["problems"])
    sp = report["spearman"]
    runtime = report["export_runtime"]
    autocast = f" ({runtime['autocast']} autocast)" if runtime["autocast"] else ""
    lines = [
        "## Verification\n",
        f"Reloaded in a fresh process and scored on {report['pairs']} held-out pairs (`{Path(report['pairs_source']).name}`)"
        f", compared with the reference: {report['reference']}.\n",
        "| check | value |",
        "|---|---|",
        f"| pairwise ranking agreement | {report['pairwise_agreement']:.4f} (required ≥ {report['min_agreement']}) |",
        f"| max abs reward difference | {report['max_abs_delta']:.3g} |",
        f"| mean abs reward difference | {report['mean_abs_delta']:.3g} |",
        f"| Spearman correlation of rewards | {'n/a' if sp is None else f'{sp:.6f}'} |",
        f"| reference accuracy / export accuracy | {report['reference_accuracy']:.3f} / {report['export_accuracy']:.3f} |",
        f"| export runtime | {', '.join(runtime['dtypes'] or [])} on {runtime['device']}{autocast} |",
        f"| tokenizer ids differing from training | {report['token_id_mismatches']} |",
        f"| result | {verdict} |\n",
        "Full figures in `verification.json`.\n",
    ]
    return "\n".join(lines)


def _tokenizer_note(provenance: dict[str, Any], report: dict[str, Any] | None) -> str:
    tok = provenance.get("tokenizer")
    if tok is None:  # a training output dir: the tokenizer is the backbone's, unchanged
        note = (
            "qrm tokenized the prompt and the response separately and closed the sequence with EOS (SEP for BERT);"
            " this tokenizer may not add the closing EOS: append `tokenizer.eos_token` to the text (`qrm.RewardModel`"
            " tokenizes as training did)"
        )
    elif tok.get("plain_text_adds_qrm_specials"):
        note = (
            "The tokenizer adds the same special tokens qrm added in training (BOS/CLS in front, EOS or SEP at the "
            "end), so the plain text `prompt + response` gives the training ids"
        )
    else:
        note = (
            "This tokenizer does not add the closing EOS that qrm added in training: append `tokenizer.eos_token`"
            " to the text"
        )
    mism = (report or {}).get("plain_text_id_mismatches")
    boundary = (
        f" On the verification pairs, tokenizing `prompt + response` in one piece gave other ids than qrm's "
        f"separate tokenization for {mism} of {2 * report['pairs']} sequences (merges across the boundary);"
        " `qrm.RewardModel` always tokenizes as training did."
        if mism
        else ""
    )
    return (
        f"{note}. Format `prompt` as in training (the chat template for conversational data, else the "
        "`\\n\\nHuman: ...\\n\\nAssistant:` layout) and pass it with the response appended." + boundary + "\n"
    )


_QRM_USAGE = (
    "### qrm\n\n```python\nfrom qrm import RewardModel\n\n"
    'rm = RewardModel.from_pretrained("<this dir or repo clone>")\n'
    'print(rm.score("\\n\\nHuman: What is 2 + 2?\\n\\nAssistant:", " 4"))\n'
    "print(rm.score_batch(prompts, responses))  # batched; tokenized exactly as in training\n```\n\n"
    "or from the shell: `qrm score --model <dir> --data rows.jsonl --out rewards.jsonl`.\n"
)
_TRL_USAGE = (
    "\n### TRL (GRPO, RLOO)\n\n```python\nimport qrm\n\n"
    'reward = qrm.reward_function("<this dir>")  # prompts, completions (plain or conversational) -> rewards\n'
    "trainer = GRPOTrainer(model=policy, reward_funcs=reward, ...)\n```\n\n"
    'The rewards are exactly qrm\'s (`qrm score`). Passing the directory itself (`reward_funcs="<this dir>"`) '
    "also loads, but TRL then tokenizes `prompt + completion` without special tokens (no BOS/EOS/CLS/SEP), so its "
    "rewards differ from the trained model's; see qrm's docs/serving.md.\n"
)


def _usage(provenance: dict[str, Any], where: str | None) -> str:
    if provenance["kind"] == "adapter":
        return _adapter_usage(provenance["load"], where or '"<this dir or repo>"') + _QRM_USAGE + _TRL_USAGE
    where = where or '"<this dir>"'
    return (
        "### transformers pipeline\n\n```python\nfrom transformers import pipeline\n\n"
        f'rm = pipeline("text-classification", model={where})\n'
        f"text = {_EXAMPLE}   # prompt + response\n"
        'print(rm(text)[0]["score"])  # the raw reward\n```\n\n'
        "`config.json` sets `problem_type: regression` (one label), so the pipeline and vLLM return the raw "
        "reward by default, not sigmoid(reward); `AutoModelForSequenceClassification.from_pretrained` loads it too "
        "(the reward is `logits[0, 0]`). The tokenizer's chat template renders conversations as training"
        " did: `tokenizer.apply_chat_template(messages, tokenize=False)`.\n\n"
        + _QRM_USAGE
        + _TRL_USAGE
        + "\n### vLLM\n\nA `*ForSequenceClassification` with one label, safetensors weights, a pad token and the"
        " head at `score.weight`: see qrm's docs/serving.md (`vllm serve <dir> --runner pooling`).\n"
        + _clients(provenance)
    )


ENCODER_PREFIXES = (
    "Bert",
    "Roberta",
    "XLMRoberta",
    "Deberta",
    "DistilBert",
    "Electra",
    "Albert",
    "MPNet",
    "ModernBert",
)


def _clients(provenance: dict[str, Any]) -> str:
    """Which RL and serving clients accept this export, with the agreement with `qrm score` measured in qrm's tests
    (docs/serving.md has the full table), and why a client cannot where it cannot."""
    arch = provenance.get("architecture") or ""
    encoder = arch.startswith(ENCODER_PREFIXES)
    no = "no: it expects a bias-free `score` head read at the last token; this encoder's `classifier` head"
    rows = [
        ("`transformers.pipeline` / vLLM pooling runner (`--dtype float32`)", "yes", "≤ 1e-5 / ≤ 7.5e-8"),
        ("`qrm.reward_function` in TRL `GRPOTrainer` / `RLOOTrainer`", "yes", "≤ 1e-6 (RLOO: 1.4e-8)"),
        ("`qrm serve` for OpenRLHF `--reward.remote_url` (`--policy-tokenizer` when the policy's differs)", "yes",
         "≤ 1e-5 (other policy tokenizer: 1.5e-8)"),
        ("OpenRLHF local reward model (`get_llm_for_sequence_regression`)",
         f"{no} on `[CLS]` is ignored and `score` newly initialised" if encoder else
         "yes (prompts through this chat template, or `--input_template \"<bos>{}\"` for raw text)",
         "–" if encoder else "0 in fp32, 2.5e-3 in its default bf16; raw prompts without BOS: 0.10"),
        ("TRL `get_reward` (PPO utility)", "no: it reads `model.score`, which an encoder lacks" if encoder else "yes",
         "–" if encoder else "equal on qrm's ids"),
        ('TRL `reward_funcs="<dir>"`', "loads, but tokenizes without BOS/EOS/CLS/SEP", "up to 0.71 (use qrm.reward_function)"),
    ]  # fmt: skip
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return (
        f"\n### Clients ({'encoder' if encoder else 'decoder'} export)\n\n| client | accepts this export | max "
        "\\|Δreward\\| vs `qrm score` (qrm's tests) |\n|---|---|---|\n" + table + "\n"
    )


def _adapter_usage(load: dict[str, Any], where: str) -> str:
    """transformers + PEFT: the quantized base as in training, the pad token qrm added, then the adapter."""
    q = load["quantization_config"]
    qlines = ""
    if q:
        args = ",\n".join(
            f"    {k}={('torch.' + v) if k in ('bnb_4bit_compute_dtype', 'bnb_4bit_quant_storage') else repr(v)}"
            for k, v in q.items()
        )
        qlines = f"quant = BitsAndBytesConfig(\n{args},\n)\n"
    if load.get("exact") is False:  # a training dir: its 4-bit load recipe is not written down beside it
        qlines = (
            "# qrm trained the adapter on the base as qrm_recipe.yaml loads it (4-bit NF4 unless it says otherwise);\n"
            "# `qrm merge --adapter-only` writes this snippet with that exact quantization config, verified.\n"
        )
    auto = (
        f"# Trained with {load['autocast']} compute: cast LoRA and head to it and score under autocast, as training did.\n"
        if load["autocast"]
        else ""
    )
    return (
        "### transformers + PEFT\n\n```python\nimport torch\nfrom peft import PeftModel\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer"
        + (", BitsAndBytesConfig" if q else "")
        + "\n\n"
        f"adapter = {where}\n"
        "tokenizer = AutoTokenizer.from_pretrained(adapter)\n"
        + qlines
        + "base = AutoModelForSequenceClassification.from_pretrained(\n"
        f'    "{load["base_model"]}", revision="{load["revision"]}", num_labels=1,\n'
        f"    pad_token_id=tokenizer.pad_token_id, dtype=torch.{load['dtype']}"
        + (", quantization_config=quant" if q else "")
        + ",\n)\n"
        "if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # qrm added a pad token\n"
        "    base.resize_token_embeddings(len(tokenizer))\n"
        "model = PeftModel.from_pretrained(base, adapter).eval()\n"
        + (
            "# bitsandbytes repacks 4-bit layers for a bf16 kernel on AVX512-BF16 CPUs; keep training's numerics:\n"
            "for m in model.modules():\n"
            '    if hasattr(m, "support_avx512bf16_for_cpu"):\n'
            "        m.support_avx512bf16_for_cpu = False\n"
            if q
            else ""
        )
        + auto
        + f'batch = tokenizer({_EXAMPLE}, return_tensors="pt")\n'
        "with torch.no_grad():\n"
        "    print(model(**batch.to(base.device)).logits[0, 0].item())\n```\n\n"
    )


def _provenance_sections(folder: Path) -> list[str]:
    """qrm's provenance files, shown as they are."""
    out = []
    for title, name, fmt in PROVENANCE_SECTIONS:
        path = folder / name
        if path.is_file():
            out.append(f"## {title}\n\nFrom `{name}`:\n\n```{fmt}\n{path.read_text(errors='replace').strip()}\n```\n")
    return out
