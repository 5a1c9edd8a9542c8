"""Progress lines with elapsed time and ETA for the diagnostic's long loops (sampling, scoring, training)."""

from __future__ import annotations

import sys
import time

# At most one line per this many seconds per loop (plus the last), so logs stay readable.
_MIN_INTERVAL_S = 2.0


class Progress:
    """`progress(done, total, note)` prints `[name] done/total note | elapsed, ETA` to stderr."""

    def __init__(self, name: str, quiet: bool = False):
        self.name, self.quiet = name, quiet
        self.start = time.perf_counter()
        self.last_print = float("-inf")

    def __call__(self, done: int, total: int, note: str = "") -> None:
        now = time.perf_counter()
        if self.quiet or (done < total and now - self.last_print < _MIN_INTERVAL_S):
            return
        self.last_print = now
        elapsed = now - self.start
        eta = elapsed / max(done, 1) * (total - done)
        width = len(str(total))
        note = f" {note}" if note else ""
        print(
            f"[{self.name}] {done:{width}d}/{total}{note} | {elapsed:6.1f}s, ETA {eta:6.1f}s",
            file=sys.stderr,
            flush=True,
        )
