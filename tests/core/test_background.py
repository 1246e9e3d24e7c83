"""core.run.io.InBackground: work started beside the caller, its value or its exception handed back by result()."""

from __future__ import annotations

import threading

import pytest

from core.run.io import InBackground


def test_result_waits_and_returns_the_value():
    release = threading.Event()
    seen = []

    def work(a, b=0):
        release.wait(5)
        seen.append(threading.current_thread().name)
        return a + b
    job = InBackground(work, 2, b=3)
    assert not seen  # still waiting: the caller went on
    release.set()
    assert job.result() == 5 and job.result() == 5
    assert seen == ["background-work"] and job.seconds > 0


def test_the_exception_is_raised_in_the_caller():
    def fail():
        raise OSError(28, "No space left on device")
    job = InBackground(fail)
    with pytest.raises(OSError, match="No space left"):
        job.result()
