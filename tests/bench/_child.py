"""One child process of a benchmark, measured from outside: its wall time and peak RSS (``os.wait4``)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class Child:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_gib: float


def run_child(cmd: list[str], cwd: Path, env: Optional[dict] = None) -> Child:
    """Run ``cmd`` to its end; stderr goes to a file (a full stderr pipe would block the child)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        err_file.seek(0)
        err = err_file.read()
    return Child(os.waitstatus_to_exitcode(status), out, err, time.perf_counter() - t0,
                 usage.ru_maxrss / 1024**2)  # KiB -> GiB
