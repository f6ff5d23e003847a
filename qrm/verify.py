"""Verification of an export in a fresh process: the pairs it is checked on, the child that reloads and scores the
export as users will (`python -m qrm.verify`), and the comparison that decides pass or fail."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import DataError, ExportError
from .files import VERIFY_PAIRS_FILE

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def verification_pairs(
    adapter: Path, verify_data: str | os.PathLike | None, tokenizer: Any, max_length: int
) -> tuple[list[dict], list[tuple[float, float]] | None, str]:
    """The pairs an export is verified on.

    Args:
        adapter (`Path`):
            The adapter dir; its `verify_pairs.jsonl` (written when training had eval data) is used by default.
        verify_data (`str` or `os.PathLike`, *optional*):
            A file of preference pairs in any format `qrm.data` reads, used instead.
        tokenizer (`PreTrainedTokenizerBase`):
            The adapter's tokenizer.
        max_length (`int`):
            Training's max_length: pairs are tokenized (and cut) as training did.

    Returns:
        `tuple`: the tokenized pair rows, the rewards stored with them at the end of training (or None), and where
        they came from. Raises `ExportError` naming the file when there are none or they cannot be read."""
    from .config import DataArguments
    from .data import DataReport, build_pairs, load_rows, tokenize_pairs

    stored: list[tuple[float, float]] | None = None
    try:
        if verify_data is not None:
            rows, where = load_rows(str(verify_data))
            pairs, report = build_pairs(rows, DataArguments(dataset=str(verify_data)), where, tokenizer)
            source = str(verify_data)
        else:
            path = adapter / VERIFY_PAIRS_FILE
            if not path.is_file():
                raise ExportError(
                    f"{adapter} has no {VERIFY_PAIRS_FILE} (it is written when training has eval data); "
                    "pass --verify-data FILE with preference pairs"
                )
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            pairs = [{k: r[k] for k in PAIR_FIELDS} | {"row": i} for i, r in enumerate(lines, 1)]
            if all("chosen_reward" in r and "rejected_reward" in r for r in lines):
                stored = [(float(r["chosen_reward"]), float(r["rejected_reward"])) for r in lines]
            report = DataReport(source=str(path), rows=len(lines), pairs=len(pairs))
            source = str(path)
        rows_tok = tokenize_pairs(pairs, tokenizer, max_length, report)
    except DataError as e:
        raise ExportError(f"verification data: {e}") from None
    if stored is not None:
        stored = [stored[r["row"] - 1] for r in rows_tok]
    return rows_tok, stored, source


def reference_description(margs: Any) -> str:
    """What the export's rewards are compared with: the trained model, scored in the exporting process.

    Args:
        margs (`ModelArguments`): the model fields of the training recipe (4-bit or not, compute dtype)."""
    return (
        f"the {'4-bit base' if margs.load_in_4bit else 'base'} + adapter, rewards recomputed in the exporting "
        f"process with the training numerics (compute dtype {margs.bnb_4bit_compute_dtype}"
        f"{'' if margs.bnb_4bit_compute_dtype == 'float32' else ', LoRA and head in it, under autocast'})"
    )


def verify_in_child(folder: Path, pairs: list[dict], batch_size: int, adapter: bool) -> dict[str, Any]:
    """Score the verification pairs with the export in `folder` in a fresh Python process (`python -m qrm.verify`).

    Args:
        folder (`Path`): the export (or adapter-only export) as written.
        pairs (`list[dict]`): tokenized pair rows (`verification_pairs`).
        batch_size (`int`): sequences per forward pass.
        adapter (`bool`): whether `folder` is an adapter-only export (loaded with plain transformers + PEFT).

    Returns:
        `dict`: the child's rewards (`chosen`, `rejected`), token-id checks, load report, runtime dtypes and
        timings. Raises `ExportError` with the tail of the child's output when it fails."""
    with tempfile.TemporaryDirectory(prefix="qrm-verify-") as tmp:
        pairs_file = Path(tmp) / "pairs.jsonl"
        result_file = Path(tmp) / "result.json"
        with open(pairs_file, "w") as f:
            for r in pairs:
                f.write(json.dumps({k: r[k] for k in (*PAIR_FIELDS, "chosen_ids", "rejected_ids")}) + "\n")
        cmd = [sys.executable, "-m", "qrm.verify", "--model", str(folder), "--pairs", str(pairs_file)]
        cmd += ["--result", str(result_file), "--batch-size", str(batch_size)] + (["--adapter"] if adapter else [])
        env = dict(os.environ)
        # The child must import this same qrm, installed or not.
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result_file.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise ExportError(f"the export could not be reloaded and scored in a fresh process:\n{tail}")
        return json.loads(result_file.read_text())


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m qrm.verify` (run by `qrm merge`): load the export as users will, score the pairs, write JSON."""
    ap = argparse.ArgumentParser(prog="python -m qrm.verify")
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--adapter", action="store_true")
    args = ap.parse_args(argv)

    from .config import read_recipe, recipe_max_length
    from .model import autocast_dtype
    from .reward_model import score_ids

    t0 = time.time()
    folder = Path(args.model)
    model, tokenizer, result = _load_as_users_do(folder, args.adapter)
    max_length = recipe_max_length(read_recipe(folder)[1])
    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    seqs, mismatched = _own_ids(rows, tokenizer, max_length)
    t1 = time.time()
    rewards = score_ids(model, seqs, tokenizer.pad_token_id, args.batch_size)
    n = len(rows)
    params = [p for p in model.parameters() if p.is_floating_point()]
    result.update(
        chosen=rewards[:n],
        rejected=rewards[n:],
        token_id_mismatches=mismatched,
        plain_text_id_mismatches=_plain_text_mismatches(rows, tokenizer),
        dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        device=str(params[0].device),
        autocast=None if (a := autocast_dtype(model)) is None else str(a).removeprefix("torch."),
        seconds={"load": round(t1 - t0, 2), "score": round(time.time() - t1, 2)},
    )
    Path(args.result).write_text(json.dumps(result) + "\n")
    return 0


def _load_as_users_do(folder: Path, adapter: bool) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, result with the load report): plain transformers (+ PEFT for an adapter-only export)."""
    if adapter:
        model, tokenizer = load_adapter_plain(folder)
        return model, tokenizer, {}
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .reward_model import default_device

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    model.to(default_device()).eval()
    report = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"}
    report["error_msgs"] = [str(e) for e in info.get("error_msgs", [])]
    return model, tokenizer, {"load_report": report}


def _own_ids(rows: list[dict], tokenizer: Any, max_length: int) -> tuple[list[list[int]], int]:
    """Every chosen then rejected sequence as the exported tokenizer gives it, and how many differ from training's.

    Pairs are tokenized as pairs: training cut the shared prompt to fit the longer of the two responses."""
    from .data import DataReport
    from .reward_model import tokenize_fitting

    pairs = [{k: r[k] for k in PAIR_FIELDS} | {"row": i} for i, r in enumerate(rows)]
    own = tokenize_fitting(pairs, tokenizer, max_length, DataReport(source="verify"))
    own_by_row = {r["row"]: r for r in own}
    seqs, mismatched = [], 0
    for side in ("chosen_ids", "rejected_ids"):
        for i, r in enumerate(rows):
            ids = own_by_row[i][side] if i in own_by_row else None
            mismatched += ids != r[side]
            seqs.append(ids if ids is not None else r[side])
    return seqs, mismatched


def _plain_text_mismatches(rows: list[dict], tokenizer: Any) -> int:
    """Plain text, as a pipeline or vLLM tokenizes it (the prompt joined to the response, specials added), against
    qrm's ids for the same untruncated text: differences come only from merges across the prompt/response boundary."""
    from .reward_model import tokenize_responses

    prompts = [r["prompt"] for r in rows] * 2
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    full = tokenize_responses(tokenizer, prompts, responses, max_length=10**9)
    plain = [tokenizer(p + r)["input_ids"] for p, r in zip(prompts, responses, strict=True)]
    return sum(1 for a, b in zip(plain, full, strict=True) if a != b)


def load_adapter_plain(folder: str | os.PathLike) -> tuple[Any, Any]:
    """Load an adapter-only export with plain transformers + PEFT, as its model card shows (no qrm loader).

    Args:
        folder (`str` or `os.PathLike`): an adapter-only export (`qrm merge --adapter-only`).

    Returns:
        `tuple`: (the `PeftModel` in eval mode, its tokenizer), built from the load recipe in `qrm_export.json`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from .files import EXPORT_INFO_FILE
    from .model import keep_training_matmul
    from .source import resolve_path

    folder = Path(folder)
    load = json.loads((folder / EXPORT_INFO_FILE).read_text())["load"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kwargs: dict[str, Any] = {}
    if load["quantization_config"]:
        q = dict(load["quantization_config"])
        for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            q[key] = getattr(torch, q[key])
        kwargs["quantization_config"] = BitsAndBytesConfig(**q)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_path(load["base_model"]),
        revision=load["revision"],
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        dtype=getattr(torch, load["dtype"]),
        **kwargs,
    )
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    keep_training_matmul(model)  # as the card's snippet does
    if load["autocast"]:
        # TRL trained LoRA and head in the compute dtype; holding them there makes score_ids autocast, as training did.
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.data = p.data.to(getattr(torch, load["autocast"]))
    return model, tokenizer


def verification_report(
    kind: str,
    dtype: str | None,
    source: str,
    reference: str,
    ref_c: list[float],
    ref_r: list[float],
    stored: list[tuple[float, float]] | None,
    child: dict[str, Any],
    threshold: float,
) -> dict[str, Any]:
    """Compare the child's rewards with the reference; everything that decides pass or fail is in here.

    Args:
        kind (`str`): `exact`, `base` or `adapter`.
        dtype (`str`, *optional*): the stored dtype (None for an adapter-only export).
        source (`str`): where the pairs came from.
        reference (`str`): what the reference rewards are (`reference_description`).
        ref_c (`list[float]`): reference rewards of the chosen responses.
        ref_r (`list[float]`): reference rewards of the rejected responses.
        stored (`list[tuple[float, float]]`, *optional*): the rewards training stored for the same pairs.
        child (`dict`): what `verify_in_child` returned.
        threshold (`float`): the pairwise agreement required to pass.

    Returns:
        `dict`: the figures (`max_abs_delta`, `spearman`, `pairwise_agreement`, `flipped_pairs`, ...), `passed`
        and the `problems` that failed it; written to `verification.json` and the model card."""
    from .metrics import spearman

    exp_c, exp_r = child["chosen"], child["rejected"]
    ref, exp = [*ref_c, *ref_r], [*exp_c, *exp_r]
    deltas = [abs(a - b) for a, b in zip(ref, exp, strict=True)]
    same = [(rc > rr) == (ec > er) for rc, rr, ec, er in zip(ref_c, ref_r, exp_c, exp_r, strict=True)]
    flipped = [
        {"pair": i, "reference_margin": ref_c[i] - ref_r[i], "export_margin": exp_c[i] - exp_r[i]}
        for i, ok in enumerate(same)
        if not ok
    ]
    n = len(same)
    agreement = sum(same) / n
    report: dict[str, Any] = {
        "kind": kind,
        "dtype": dtype,
        "pairs": n,
        "pairs_source": source,
        "reference": reference,
        "export_runtime": {k: child.get(k) for k in ("dtypes", "device", "autocast")},
        "max_abs_delta": max(deltas),
        "mean_abs_delta": sum(deltas) / len(deltas),
        "spearman": spearman(ref, exp),
        "pairwise_agreement": agreement,
        "reference_accuracy": sum(c > r for c, r in zip(ref_c, ref_r, strict=True)) / n,
        "export_accuracy": sum(c > r for c, r in zip(exp_c, exp_r, strict=True)) / n,
        "flipped_pairs": flipped,
        "min_agreement": threshold,
        "token_id_mismatches": child.get("token_id_mismatches"),
        "plain_text_id_mismatches": child.get("plain_text_id_mismatches"),
        "load_report": child.get("load_report"),
    }
    problems = _problems(agreement, threshold, child)
    report.update(passed=not problems, problems=problems)
    if stored is not None:
        stored_all = [c for c, _ in stored] + [r for _, r in stored]
        report["stored_rewards_max_abs_delta"] = max(abs(a - b) for a, b in zip(ref, stored_all, strict=True))
        report["stored_rewards_note"] = (
            "reference vs the rewards training wrote to verify_pairs.jsonl (same model, scored at the end of training)"
        )
    for key in ("max_abs_delta", "mean_abs_delta", "spearman"):
        if isinstance(report[key], float) and not math.isfinite(report[key]):
            report[key] = None
    return report


def _problems(agreement: float, threshold: float, child: dict[str, Any]) -> list[str]:
    problems = []
    if agreement < threshold:
        problems.append(f"pairwise agreement {agreement:.4f} < min_agreement {threshold}")
    missing = child.get("load_report", {}).get("missing_keys", [])
    if missing:
        problems.append(f"weights missing from the export (newly initialized on load): {missing[:5]}")
    if child.get("token_id_mismatches"):
        problems.append(f"the exported tokenizer gives different ids for {child['token_id_mismatches']} sequences")
    return problems


def failure_message(report: dict[str, Any], out: Path) -> str:
    """The message of a failed verification: the problems, the figures, where the export is, and a hint.

    Args:
        report (`dict`): what `verification_report` returned.
        out (`Path`): where the export was written (it is kept, marked failed)."""
    hint = ""
    if report["kind"] == "exact" and report["dtype"] != "float32":
        hint = f"; {report['dtype']} rounding can flip near-tied pairs: try --dtype float32 or lower --min-agreement"
    return (
        f"verification failed: {'; '.join(report['problems'])} (max |Δreward| {report['max_abs_delta']:.3g} over "
        f"{report['pairs']} pairs). The export is in {out} with verification.json marked failed{hint}"
    )


if __name__ == "__main__":
    sys.exit(main())
