"""What kdcache tells the person running it: the `kdcache` logger, and progress bars or lines.

Library code never prints: it logs to `log` (logger "kdcache"), which writes plain lines to stdout
(warnings to stderr) by default, so the command line and the Python API say the same; `logging.getLogger("kdcache")
.setLevel(logging.WARNING)` silences it. Long loops report through `Progress`: a tqdm bar on a
terminal, and on anything else (a log file, CI, `kdcache run > log`) one line every few seconds.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("kdcache")

LINE_SECONDS = 10.0  # a progress line at most this often when stdout is not a terminal: a log stays readable


class _Stdout(logging.StreamHandler):
    """A handler on whatever sys.stdout (warnings: sys.stderr) is when a record is written (pytest's
    capture, contextlib.redirect_stdout and a CLI pipe all see it), not on the stream of import time."""

    def emit(self, record):
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


if not log.handlers:  # once per process, however often this module is imported
    _handler = _Stdout()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # a user's root handler would print every line twice


def is_terminal() -> bool:
    return hasattr(sys.stdout, "isatty") and sys.stdout.isatty()


class Progress:
    """Progress over `total` units: a tqdm bar on a terminal, else a line at most every LINE_SECONDS.

    `update(n, **postfix)` counts n more units; postfix values (losses, say) are shown on the bar and
    in the lines. Callable postfix values are evaluated only when shown, so a loss tensor is read
    (one device sync) only when a line or the bar is drawn, not every step.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "samples", initial: int = 0, enabled: bool = True):
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.enabled = enabled and log.isEnabledFor(logging.INFO)
        self.started = self.last = time.perf_counter()
        self.start_count = initial
        self.bar = None
        if self.enabled and is_terminal():
            from tqdm import tqdm  # deferred: only a terminal draws a bar

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=True, leave=False,
                            dynamic_ncols=True, file=sys.stdout)

    def update(self, n: int, **postfix) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix and time.perf_counter() - self.last >= 0.5:
                self.last = time.perf_counter()
                self.bar.set_postfix(_shown(postfix), refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= LINE_SECONDS and self.done < self.total:
            self.last = now
            log.info(self.line(postfix))

    def line(self, postfix: dict | None = None) -> str:
        elapsed = time.perf_counter() - self.started
        rate = (self.done - self.start_count) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        parts = [f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({100.0 * self.done / max(1, self.total):.0f}%)",
                 f"{rate:,.0f} {self.unit}/s", f"ETA {_duration(left)}"]
        parts += [f"{k} {v}" for k, v in _shown(postfix or {}).items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _shown(postfix: dict) -> dict:
    out = {}
    for k, v in postfix.items():
        v = v() if callable(v) else v
        out[k] = f"{v:.4g}" if isinstance(v, float) else v
    return out


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
