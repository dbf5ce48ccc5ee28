"""Ctrl-C and SIGTERM for command-line runs, made reliable.

Python raises KeyboardInterrupt wherever the main thread happens to be; if
that is inside a finaliser (``__del__``, a weakref callback) the exception
is printed and swallowed, and the run would carry on. So the handler both
raises at once and remembers the signal; :func:`checkpoint`, called between
pipeline steps and before every output file, raises it again if it was lost.
"""

from __future__ import annotations

import signal

_pending: int | None = None
_installed: dict[int, object] = {}


class Terminated(BaseException):
    """SIGTERM as an exception, so that temporary files are cleaned up on the way out."""


def _exception(signum: int) -> BaseException:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum, frame):
    global _pending
    _pending = signum
    raise _exception(signum)


def install() -> None:
    """Handle SIGINT and SIGTERM (main thread only; elsewhere this does nothing)."""
    global _pending
    _pending = None
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            _installed[signum] = signal.signal(signum, _handler)
        except ValueError:  # not the main thread (e.g. a Dask worker)
            return


def restore() -> None:
    """Put back the handlers that :func:`install` replaced."""
    global _pending
    for signum, previous in _installed.items():
        signal.signal(signum, previous)
    _installed.clear()
    _pending = None


def checkpoint() -> None:
    """Raise the pending signal's exception if one arrived and was swallowed."""
    if _pending is not None:
        raise _exception(_pending)
