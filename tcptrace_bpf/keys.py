"""A small key reader for the live view (rich draws but reads no input).

The terminal goes into cbreak mode (keys arrive one at a time, no echo) but keeps ISIG, so Ctrl-C still
raises KeyboardInterrupt and quits cleanly; the previous mode is restored on exit, even on errors.
Chosen over textual to keep one rendering library and a view that is plain rich renderables.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from typing import Any, Optional


class KeyReader:
    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdin
        self._saved: Optional[list[Any]] = None

    def __enter__(self) -> KeyReader:
        if self.stream.isatty():
            fd = self.stream.fileno()
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self._saved)
            self._saved = None

    def read(self, timeout: float) -> Optional[str]:
        """One key, or None after `timeout` seconds (always None when stdin is not a terminal)."""
        if self._saved is None:
            time.sleep(timeout)
            return None
        fd = self.stream.fileno()
        ready, _w, _x = select.select([fd], [], [], timeout)
        if not ready:
            return None
        data = os.read(fd, 8)
        return data.decode("utf-8", "replace")[:1] if data else None
