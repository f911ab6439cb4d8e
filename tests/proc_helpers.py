"""Kill tests: run a child that parks at a chosen point, then SIGKILL it there (no sleeping, no timing).

The child prints progress lines and, at the point to be killed, ``parked <path>`` and then blocks reading its
stdin; the test reads lines until that one, checks its preconditions, and the helper kills the child.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


@contextmanager
def killed_when_parked(cmd: Sequence[str], what: str, **popen: Any) -> Iterator[list[str]]:
    """Start ``cmd``, read its stdout up to the line ``parked ...`` and yield the lines read so far (stripped).

    The block runs while the child is parked; on leaving it (also on a failed assertion) the child is SIGKILLed
    and reaped, and its status is checked to be that kill. ``what`` names the parking point for the message when
    the child ends before reaching it. ``popen``: more `subprocess.Popen` arguments (``stderr=``).
    """
    proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **popen)
    lines: list[str] = []
    try:
        while not (lines and lines[-1].startswith("parked ")):
            line = proc.stdout.readline()
            assert line, f"the child ended before {what}: {lines}"
            lines.append(line.strip())
        yield lines
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
