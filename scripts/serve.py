#!/usr/bin/env python
"""HTTP reward server for a qrm export or adapter dir:
`python scripts/serve.py --model DIR [--host 127.0.0.1] [--port 8000]`.

Same as `qrm serve`; see `--help`. POST /get_reward (OpenRLHF remote reward), POST /score, GET /health, /docs."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run `qrm serve` with the given (or command-line) arguments."""
    from qrm.cli import run  # one handler for every command: exit codes and one-line errors as `qrm serve`

    return run("serve", sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
