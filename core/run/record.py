"""The run record: ``metrics.json`` (schema ``prunelab-run/1``) and its W&B mirror, written by one object.

Every run dir holds one record, rewritten atomically after each update. Top-level keys:

    schema       "prunelab-run/1"
    status       running | completed | failed | killed | interrupted | dry_run (a plan, nothing loaded)
                 (readers add "dead": see run_status)
    task         the recipe that ran;  pid, host, started, heartbeat, finished
    method       what produced the model (a pruner's name, "base", ...)
    compression  {"unit": the pruner's ratio_target (groups | params | sparsity | ...), "amount": float, ...}
    params       {"base": int, "pruned": int, "kept_pct": float, ...}
    eval         {"base": {...}, "pruned": {...}} or {"model": {...}}
    optimized_metric  {"name", "direction", "value"}: what run.py returned to a sweeper
    timings, data, config, error, and the sections each recipe adds (pruning, analysis, checkpoint, table)

Recipes receive a :class:`RunContext` and call ``log``, ``log_table``, ``log_image``. ``wandb`` is imported
only when ``logger=wandb``.

The W&B side (names, flattened config, group, standard summary) is defined in :mod:`core.run.wandb_view`;
the task's recipe hands in its view (``wandb_view``: where its method name and layer range come from).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from core.run.errors import RunDirError
from core.run.io import atomic_write_json
from core.run.wandb_view import (EVAL_COLUMNS, EVAL_TABLE, NO_VIEW, WandbView, derived_config, eval_table_rows, get,
                                 per_layer_key, per_layer_rows, standard_summary, wandb_config)

log = logging.getLogger(__name__)

SCHEMA = "prunelab-run/1"
HEARTBEAT_S = 30.0  # a running record is rewritten at least this often
FINAL_STATUSES = ("completed", "failed", "killed", "interrupted", "dry_run")  # dry_run: a plan only (recipes/_plan.py)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def saved_checkpoint(run_dir: Path, m: dict) -> Optional[Path]:
    """The checkpoint folder a run saved, found in ``run_dir`` (which may have moved since): its record's
    ``checkpoint.path`` by name (``model/``, or the folder ``output_name`` named), else the recorded path itself,
    else ``model/``; None when there is none."""
    recorded = (m.get("checkpoint") or {}).get("path") if isinstance(m.get("checkpoint"), dict) else None
    named = [run_dir / Path(recorded).name, Path(recorded)] if isinstance(recorded, str) and recorded else []
    return next((p for p in [*named, run_dir / "model"] if p.is_dir()), None)


def run_status(m: dict, now: Optional[float] = None) -> str:
    """A record's status as a reader should report it: a ``running`` record whose process is gone (same host)
    or whose heartbeat stopped (another host, 3 missed beats) is ``dead``."""
    status = m.get("status") or "unknown"
    if status != "running":
        return status
    pid, host = m.get("pid"), m.get("host")
    if isinstance(pid, int) and host == socket.gethostname():
        return "running" if _pid_alive(pid) else "dead"
    beat = m.get("heartbeat_unix")
    if isinstance(beat, (int, float)):
        return "running" if (now or time.time()) - beat < 3 * HEARTBEAT_S + 5 else "dead"
    return "dead" if pid is None else "running"


class RunContext:
    """Where one run writes: ``run_dir/metrics.json`` and, optionally, a W&B run."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        task: str,
        config: Optional[dict] = None,
        logger: str = "none",
        wandb_project: str = "prunelab",
        wandb_mode: str = "offline",
        wandb_group: Optional[str] = None,
        wandb_tags: Optional[list[str]] = None,
        wandb_log_model: bool = False,
        run_name: Optional[str] = None,
        heartbeat_s: Optional[float] = HEARTBEAT_S,
        wandb_view: WandbView = NO_VIEW,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics: dict[str, Any] = {
            "schema": SCHEMA,
            "status": "running",
            "task": task,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _now(),
            "heartbeat": _now(),
            "heartbeat_unix": time.time(),
            "run_dir": str(self.run_dir.resolve()),
        }
        self._lock = threading.RLock()  # the heartbeat thread and the run both write the record
        self._wandb = None
        self._config = dict(config or {})
        self._log_model = wandb_log_model
        self._view = wandb_view
        self._tables: set[str] = set()  # the tables logged to W&B (finish() adds eval/results when missing)
        try:  # the first write is exclusive: a record is never created over another run's
            atomic_write_json(self.path, self.metrics, exclusive=True)
        except FileExistsError:
            raise RunDirError(f"{self.run_dir} already holds a run; runs never overwrite each other") from None
        if logger == "wandb" and wandb_mode != "disabled":
            import wandb  # local: only with logger=wandb (seconds to import; validation imports this module)

            self._wandb = wandb.init(
                project=wandb_project,
                mode=wandb_mode,
                dir=str(self.run_dir),
                group=wandb_group,
                job_type=task,
                tags=wandb_tags or None,
                name=run_name or self.run_dir.name,
                config=wandb_config({"task": task, **self._config}, self._view),
                reinit="finish_previous",
            )
            self.metrics["wandb"] = {"mode": wandb_mode, "dir": str(Path(self._wandb.dir).parent),
                                     "run_id": self._wandb.id, "group": wandb_group}
            self._write()
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None
        if heartbeat_s:
            self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat_s,), daemon=True,
                                          name="prunelab-heartbeat")
            self._beat.start()

    @property
    def path(self) -> Path:
        return self.run_dir / "metrics.json"

    def _write(self) -> None:
        with self._lock:
            atomic_write_json(self.path, self.metrics)

    def _heartbeat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                with self._lock:
                    if self.metrics.get("status") != "running":
                        return
                    self.metrics["heartbeat"] = _now()
                    self.metrics["heartbeat_unix"] = time.time()
                    self._write()
            except Exception as e:  # noqa: BLE001 - a full disk must not kill the run from a side thread
                log.warning("heartbeat not written: %s", e)

    def log(self, section: str, values: Any) -> None:
        """Store ``values`` under ``metrics[section]`` (dicts merge) and mirror scalars to W&B."""
        with self._lock:
            if isinstance(values, dict) and isinstance(self.metrics.get(section), dict):
                self.metrics[section].update(values)
            else:
                self.metrics[section] = values
            self._write()
        if self._wandb is not None:
            flat = _flatten({section: values}) if isinstance(values, dict) else {section: values}
            scalars = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if scalars:
                self._wandb.summary.update(scalars)
            texts = {k: v for k, v in flat.items() if isinstance(v, str)}
            if texts:
                self._wandb.summary.update(texts)

    def log_table(self, name: str, frame: Any) -> None:
        """A pandas DataFrame as a ``wandb.Table`` (no-op without W&B; write the CSV yourself). A table with one
        row per ``layer_idx`` is also logged as per-layer series ``<name>/<column>`` against ``<name>/layer_idx``
        (one W&B step per layer), so a line plot shows each run's numbers along the depth."""
        if self._wandb is None:
            return
        import wandb  # local: only with logger=wandb (seconds to import; validation imports this module)

        frame = frame.reset_index(drop=True)
        self._wandb.log({name: wandb.Table(dataframe=frame)})
        self._tables.add(name)
        rows = per_layer_rows(frame.to_dict("records")) if "layer_idx" in frame.columns else None
        if rows:
            step = per_layer_key(name, "layer_idx")
            self._wandb.define_metric(step, hidden=True)
            self._wandb.define_metric(per_layer_key(name, "*"), step_metric=step, summary="none")
            for row in rows:
                self._wandb.log({per_layer_key(name, k): v for k, v in row.items()})

    def log_series(self, name: str, values: dict[str, Any]) -> None:
        """One point of a curve (W&B only: e.g. a search's best fitness after each evaluation)."""
        if self._wandb is None:
            return
        self._wandb.log({f"{name}/{k}": v for k, v in values.items() if v is not None})

    def log_image(self, name: str, path: str | Path) -> None:
        if self._wandb is None:
            return
        import wandb  # local: only with logger=wandb (seconds to import; validation imports this module)

        self._wandb.log({name: wandb.Image(str(path))})

    def log_text(self, name: str, text: str) -> None:
        if self._wandb is None:
            return
        import wandb  # local: only with logger=wandb (seconds to import; validation imports this module)

        self._wandb.log({name: wandb.Html(f"<pre>{text}</pre>")})

    def finish(self, status: str = "completed", error: Optional[BaseException] = None) -> None:
        """Write the final status (once; a later call is ignored) and close W&B."""
        self._stop.set()
        try:
            with self._lock:
                if self.metrics.get("status") in FINAL_STATUSES:
                    return
                self.metrics["status"] = status
                self.metrics["finished"] = _now()
                if error is not None:
                    self.metrics["error"] = {
                        "type": type(error).__name__,
                        "message": str(error),
                        "traceback": "".join(traceback.format_exception(error))[-4000:],
                    }
                self._write()
        finally:
            if self._wandb is not None:
                wb, self._wandb = self._wandb, None
                self._wandb_end(wb, status)
                wb.summary["status"] = status
                wb.finish(exit_code=0 if status == "completed" else 1)

    def _wandb_end(self, wb: Any, status: str) -> None:
        """The standard summary names, ``method`` / ``layer_range`` from the record, the eval table if no recipe
        logged one, and the checkpoint artifact (``log_model``). W&B mirrors the record: a failure here is a
        warning, never the run's failure."""
        import wandb  # local: only with logger=wandb (seconds to import; validation imports this module)

        with self._lock:
            record = dict(self.metrics)
        try:
            wb.summary.update(standard_summary(record, self._view))
            derived = {k: v for k, v in derived_config(self._config, record, self._view).items() if v is not None}
            wb.config.update(derived, allow_val_change=True)
            rows = eval_table_rows(record)
            if rows and EVAL_TABLE not in self._tables:
                data = [[r[c] for c in EVAL_COLUMNS] for r in rows]
                wb.log({EVAL_TABLE: wandb.Table(columns=EVAL_COLUMNS, data=data)})
            if self._log_model and status == "completed":
                self._log_checkpoint(wb, record)
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.warning("W&B: the run's summary / artifact was not fully logged: %s: %s", type(e).__name__, e)

    def _log_checkpoint(self, wb: Any, record: dict) -> None:
        """The saved model dir as a ``model`` artifact referencing its files (``file://``: nothing is copied)."""
        import wandb  # local: only with logger=wandb (seconds to import; validation imports this module)

        path = Path(get(record, "checkpoint", "path") or self.run_dir / "model")
        if not path.is_dir():
            log.info("logger.log_model: no checkpoint in %s (save_model=false?); no artifact", path)
            return
        art = wandb.Artifact(f"model-{wb.id}", type="model", metadata={
            "method": record.get("method"), "compression": record.get("compression"),
            "params": record.get("params"), "summary": standard_summary(record, self._view),
            "path": str(path.resolve())})
        art.add_reference(path.resolve().as_uri())
        wb.log_artifact(art)
