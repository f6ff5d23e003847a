#!/usr/bin/env python
"""Upload a qrm export or adapter dir to the Hugging Face Hub: `python scripts/push.py --path DIR --repo-id ID`.

Same as `qrm push`; see `--help`. The token comes from HF_TOKEN or `hf auth login` and is never printed.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run `qrm push` with the given (or command-line) arguments."""
    # Imported here so `--help` and import checks stay cheap and huggingface_hub loads only when used.
    from qrm.cli import run  # one handler for every command: exit codes and one-line errors as `qrm push`

    return run("push", sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
