"""Small exports for client tests: a pretrained or tiny backbone with a seeded score head, saved the way `qrm merge`
saves an export (a `*ForSequenceClassification` with `problem_type: regression`, the tokenizer `qrm merge` ships)."""

from __future__ import annotations

from pathlib import Path


def seeded_export(base: str | Path, out: Path, seed: int = 0) -> Path:
    """`base` as a one-label regression classifier with a seeded head, plus the export tokenizer
    (`qrm.export_tokenizer.save_tokenizer`: EOS appended for decoders, qrm's plain chat template)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qrm.export_tokenizer import save_tokenizer
    from qrm.source import resolve_path

    base = resolve_path(str(base))
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, problem_type="regression")
    model.config.pad_token_id = AutoTokenizer.from_pretrained(base).pad_token_id
    model.save_pretrained(out)
    save_tokenizer(Path(base), out)
    return out
