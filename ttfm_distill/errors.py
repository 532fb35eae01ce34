"""Every error ttfm-distill raises on purpose derives from :class:`TTFMError`.

The CLI turns a ``TTFMError`` into one line and a non-zero exit; anything
else reaching it is a bug and is reported as one.  Module-specific errors
(``TeacherLoadError``, ``StudentLoadError``, ``DataError``, ...) live beside
the code that raises them and derive from the classes here.  The built-in
base (``ValueError`` or ``RuntimeError``) stays as a second parent so older
callers that catch those keep working.
"""

from __future__ import annotations


class TTFMError(Exception):
    """Base of every deliberate error; the message names the problem and the fix."""

    #: exit code of the CLI: 2 for a bad setting or input, 1 for a run that could not go on
    exit_code = 2


class ConfigError(TTFMError, ValueError):
    """A bad setting; the message names it and the fix."""


class RunError(TTFMError, RuntimeError):
    """A run that cannot go on; the message says why and what to do."""

    exit_code = 1


class NonFiniteLoss(RunError):
    """The loss became NaN or Inf."""


class Interrupted(RunError):
    """SIGINT or SIGTERM: a checkpoint was saved; exit 128 + the signal number."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt wherever it lands (the CLI, and the trainer's checkpoint-on-interrupt)."""

    signum = 15


class OutputInUse(RunError):
    """Another live process holds the run folder's lock."""


class InputError(TTFMError, ValueError):
    """Bad input that no more specific class names (a file's contents, a sampler's argument)."""
