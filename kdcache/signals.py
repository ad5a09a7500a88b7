"""SIGTERM handled as Ctrl-C is: an exception where the process is, so a stopped job unwinds.

Unwinding is what leaves a resumable state: a dump records the blocks it wrote, locks are
released, `--jobs` ends its job processes and their loader workers. The default SIGTERM ends the
process where it stands, and its children with it only if they notice.
"""
from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """Raised by SIGTERM inside `sigterm_raises()`; a KeyboardInterrupt, so every cleanup that
    runs on Ctrl-C runs on it too."""


def _raise(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises Terminated in the main thread. A handler someone else set
    (an embedding program's) is left alone, as is every thread but the main one (where Python
    runs handlers)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
