"""The `qrm` command: one subcommand per concern, each implemented by its module's `main(argv)`.

Every subcommand (and every `scripts/*.py`) goes through `main`, so all fail the same way:

- 0: done; 1: the command ran and its check failed (`qrm plan`: does not fit; `qrm merge`: verification failed);
- 2: bad input (recipe, flag, data, path): one line naming the file/row/field or flag, no traceback;
- 3/4: `qrm train` stopped on a non-finite loss / was preempted (checkpoint saved);
- 70: internal error (a bug): a short line, and the full traceback in a log file whose path is printed;
- 130: interrupted (Ctrl-C).

`QRM_DEBUG=1` also prints the traceback of a bad-input error."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
import traceback
from typing import Any

from .errors import FlagError, UserError, VerificationError

COMMANDS = {
    "train": ("qrm.train", "train a reward model from a recipe"),
    "plan": ("qrm.plan", "estimate peak GPU memory for a recipe before launch"),
    "eval": ("qrm.evaluate", "accuracy, calibration, length bias and probes for a trained model"),
    "merge": ("qrm.export", "merge the adapter into a standalone model and verify it"),
    "score": ("qrm.score", "score (prompt, response) rows or pairs with a model"),
    "push": ("qrm.hub", "push a model or adapter to the Hugging Face Hub"),
    "serve": ("qrm.serve", "HTTP reward server: OpenRLHF /get_reward, /score, dynamic batching"),
}


USER_ERROR_EXIT = 2
INTERNAL_ERROR_EXIT = 70  # sysexits.h EX_SOFTWARE
INTERRUPTED_EXIT = 130


def check_flags(prog: str, **checks: Any) -> None:
    """Range checks for common flags: `batch_size=N` (>= 1), `max_length=N` (>= 8 or None).

    Raises `FlagError` naming the flag (`--batch-size`) and its value."""
    for name, value in checks.items():
        flag = "--" + name.replace("_", "-")
        low = {"batch_size": 1, "max_length": 8}[name]
        if value is not None and value < low:
            raise FlagError(f"{flag} {value}: must be an integer >= {low}")


def check_model_dir(flag: str, path: str) -> None:
    """`path` must be a directory holding an adapter (adapter_config.json) or an export (config.json)."""
    p = os.path.expanduser(path)
    if not os.path.exists(p):
        raise FlagError(f"{flag} {path}: no such directory")
    if not os.path.isdir(p):
        raise FlagError(f"{flag} {path}: is a file; expected an adapter dir (qrm train) or an export dir (qrm merge)")
    from .files import dir_kind

    if dir_kind(p) is None:
        raise FlagError(
            f"{flag} {path}: holds no adapter_config.json or config.json: not an adapter dir (qrm train) or an "
            "export dir (qrm merge)"
        )


def check_out_path(out_flag: str, out: str | None, inputs: dict[str, str | None], replaced: bool = False) -> None:
    """An output path may not equal, or lie inside, any input (flag -> path); with `replaced` (the output directory
    is replaced as a whole), no input may lie inside it either."""
    if not out:
        return
    o = os.path.realpath(os.path.expanduser(out))
    for flag, value in inputs.items():
        if not value:
            continue
        v = os.path.realpath(os.path.expanduser(value))
        if o == v or o.startswith(v.rstrip(os.sep) + os.sep):
            what = "is" if o == v else "lies inside"
            raise FlagError(f"{out_flag} {out} {what} the input {flag} {value}; writing it would destroy the input")
        if replaced and v.startswith(o.rstrip(os.sep) + os.sep):
            raise FlagError(f"the input {flag} {value} lies inside {out_flag} {out}, which would be replaced")


def debug() -> bool:
    """Whether `QRM_DEBUG` asks for tracebacks of bad-input errors too."""
    return os.environ.get("QRM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def user_error(prog: str, exc: BaseException) -> int:
    """Print a bad-input error as one line (`prog: error: ...`), with the traceback under QRM_DEBUG=1; returns 2."""
    if debug():
        traceback.print_exception(exc, file=sys.stderr)
    text = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)
    return USER_ERROR_EXIT


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and getattr(exc, "filename", None) is not None:
        return True  # permission denied, no space left, not a directory ...: about a path the user gave
    return isinstance(exc, UserError)  # every error type meaning "the input is wrong" (qrm.errors)


def internal_error(prog: str, exc: BaseException) -> int:
    """Write the full traceback to a log file and print one line saying where it is; returns 70."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = os.path.join(tempfile.gettempdir(), f"{prog.replace(' ', '-')}-{stamp}-{os.getpid()}.log")
    text = "".join(traceback.format_exception(exc))
    try:
        with open(log, "w") as f:
            f.write(f"{prog} {' '.join(sys.argv[1:])}\n{text}")
        where = f"full traceback in {log}"
    except OSError:
        where = "could not write the log file; traceback follows"
        print(text, file=sys.stderr)
    if debug() and not where.startswith("could"):
        print(text, file=sys.stderr)
    first = " ".join(str(exc).split("\n")[0].split())
    print(f"{prog}: internal error: {type(exc).__name__}: {first} ({where})", file=sys.stderr)
    return INTERNAL_ERROR_EXIT


def run(cmd: str, argv: list[str]) -> int:
    """Run one subcommand's `main(argv)` under the common handler (see the module docstring for exit codes)."""
    prog = f"qrm {cmd}"
    try:
        module = importlib.import_module(COMMANDS[cmd][0])
        return int(module.main(argv) or 0)
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, one `error:` line after the usage)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else USER_ERROR_EXIT)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as exc:
        if isinstance(exc, VerificationError):
            print(f"{prog}: {exc}", file=sys.stderr)
            return 1
        if _is_user_error(exc):
            return user_error(prog, exc)
        return internal_error(prog, exc)


def main(argv: list[str] | None = None) -> int:
    """`qrm <command> [options]`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        out = sys.stdout if argv else sys.stderr
        print("usage: qrm <command> [options]\n\ncommands:", file=out)
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<7}{help_}", file=out)
        if argv:
            return 0
        print("qrm: error: give a command", file=sys.stderr)
        return USER_ERROR_EXIT
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"qrm: error: unknown command {cmd!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return USER_ERROR_EXIT
    return run(cmd, rest)


if __name__ == "__main__":
    sys.exit(main())
