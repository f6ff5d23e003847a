"""Every error type qrm shows its user, in one place and importable without torch.

`UserError` is the input being wrong: `qrm` prints its first line and exits 2 (`qrm.cli`). `VerificationError` is an
export that was written but failed its check (exit 1); `NonFiniteError` and `Preempted` stop `qrm train` (exit 3 and
4); `ServeError` is a request `qrm serve` refuses (an HTTP status). Anything else that escapes a command is a bug
(exit 70), whatever its type, a bare `ValueError` included."""

from __future__ import annotations


class UserError(Exception):
    """The input (recipe, flag, data, path) cannot be used; the message names it and is meant for the user."""


class FlagError(UserError, ValueError):
    """A command-line flag with a value that cannot be used; the message names the flag."""


class RecipeError(UserError, ValueError):
    """A recipe or an override that cannot be used."""


class LaunchError(RecipeError):
    """The recipe cannot run under the launcher it was started with."""


class DataError(UserError, ValueError):
    """Malformed preference data; the message names the file, the row and the field."""


class SourceError(UserError, ValueError):
    """`model_name_or_path` names something qrm cannot turn into a checkpoint (missing package, not a GGUF, ...)."""


class ExportError(UserError):
    """An export that cannot go ahead; the message is meant for the user."""


class VerificationError(ExportError):
    """The export was written but does not reproduce the trained model well enough; `report` has the figures."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class PushError(UserError):
    """A push that cannot or must not go ahead; the message is one line meant for the user."""


class NonFiniteError(RuntimeError):
    """A training step produced a NaN/Inf loss or gradient; raised before the optimizer applied it."""


class Preempted(RuntimeError):
    """The run got SIGTERM/SIGUSR1, saved a checkpoint at the next step boundary and stopped."""

    def __init__(self, signal_name: str, step: int, checkpoint: str) -> None:
        super().__init__(f"{signal_name}: stopped after step {step}; checkpoint {checkpoint} saved, resume from it")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class ServeError(Exception):
    """A request the server refuses: HTTP `status`, the offending `field` and a one-line message."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message
