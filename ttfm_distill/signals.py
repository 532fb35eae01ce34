"""Signals as exceptions: SIGTERM becomes an interrupt (errors.Terminated), for the CLI and the trainer alike."""

from __future__ import annotations

import signal

from .errors import Terminated


class SigtermAsInterrupt:
    """Inside: SIGTERM raises :class:`~ttfm_distill.errors.Terminated` (an interrupt carrying signal 15), so a
    killed run saves its checkpoint as Ctrl-C does; the handler before is restored on exit."""

    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise Terminated

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def interrupt_signal(exc: BaseException) -> int:
    """The signal number behind a ``KeyboardInterrupt`` (SIGINT unless it is a :class:`Terminated`)."""
    return Terminated.signum if isinstance(exc, Terminated) else int(signal.SIGINT)
