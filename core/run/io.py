"""Atomic file and directory writes: a crash never leaves a half-written result that looks complete.

Files are written under a temporary name, fsynced, and renamed; directories are filled under a hidden
``.<name>.partial-<pid>-*`` name, every file and the directory fsynced, renamed, and the parent fsynced.
A full disk is a :class:`~core.run.errors.RunDirError` with one line, and the partial output is removed.
:class:`InBackground` runs one such write (or any work outside the interpreter lock) beside the caller's.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from core.run.errors import RunDirError


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "value"):  # enums
        return obj.value
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_floats(obj: Any) -> Any:
    """NaN/inf are not JSON: write them as null so a failed number never reads as a number."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _no_space(e: OSError, what: Path) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RunDirError(f"no space left on the device while writing {what} ({e.strerror}); free some space "
                           "or point paths.outputs_root / hydra.run.dir at a bigger disk")
    return e


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str, *, exclusive: bool = False, mode: int = 0o644) -> Path:
    """Write ``text`` to ``path`` atomically; ``exclusive``: fail with FileExistsError if ``path`` exists; ``mode``
    (less the umask) is set before the file appears (0o755: a script that is executable from the start)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        if exclusive:
            os.link(tmp, path)  # atomic, and fails if the name exists: never replaces another run's file
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _no_space(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any, *, exclusive: bool = False) -> Path:
    text = json.dumps(_clean_floats(obj), indent=2, default=_json_default) + "\n"
    return atomic_write_text(path, text, exclusive=exclusive)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside ``target``; rename it to ``target`` only if the block succeeds.

    An existing ``target`` is refused rather than overwritten (runs never overwrite each other).
    """
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755 & ~_umask())
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o644 & ~_umask())
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _no_space(e, target) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class InBackground:
    """``fn(*args, **kwargs)`` started in a thread now; :meth:`result` waits for it and returns its value or raises
    its exception in the caller. For work that spends its time outside the interpreter lock (safetensors writes,
    fsync, torch kernels, file reads, imports waiting on disk) beside Python work of the caller."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any):
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._seconds = 0.0

        def body() -> None:
            t0 = time.perf_counter()
            try:
                self._value = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller by result()
                self._error = e
            self._seconds = time.perf_counter() - t0

        self._thread = threading.Thread(target=body, name=f"background-{getattr(fn, '__name__', 'work')}",
                                        daemon=True)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    @property
    def seconds(self) -> float:
        """How long the work itself took (once :meth:`result` returned)."""
        return self._seconds
