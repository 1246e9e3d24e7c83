"""Run bookkeeping: ``metrics.json`` (with ``status``) and the W&B run, in one object.

Task code receives a :class:`RunContext` and calls ``log``, ``log_table``,
``log_image``; the context writes ``metrics.json`` atomically after every update
and mirrors everything to W&B when ``logger=wandb``. ``wandb`` is imported
lazily so ``logger=none`` never pays for it.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from core.io import atomic_write_json

log = logging.getLogger(__name__)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


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
        run_name: Optional[str] = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics: dict[str, Any] = {
            "status": "running",
            "task": task,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "run_dir": str(self.run_dir.resolve()),
        }
        self._wandb = None
        if logger == "wandb" and wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=wandb_project,
                mode=wandb_mode,
                dir=str(self.run_dir),
                group=wandb_group,
                job_type=task,
                tags=wandb_tags or None,
                name=run_name or self.run_dir.name,
                config=config or {},
                reinit="finish_previous",
            )
            self.metrics["wandb"] = {"mode": wandb_mode, "dir": str(Path(self._wandb.dir).parent),
                                     "run_id": self._wandb.id}
        self._write()

    @property
    def path(self) -> Path:
        return self.run_dir / "metrics.json"

    def _write(self) -> None:
        atomic_write_json(self.path, self.metrics)

    def log(self, section: str, values: Any) -> None:
        """Store ``values`` under ``metrics[section]`` (dicts merge) and mirror scalars to W&B."""
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
        """A pandas DataFrame as a ``wandb.Table`` (no-op without W&B; write the CSV yourself)."""
        if self._wandb is None:
            return
        import wandb

        self._wandb.log({name: wandb.Table(dataframe=frame.reset_index(drop=True))})

    def log_image(self, name: str, path: str | Path) -> None:
        if self._wandb is None:
            return
        import wandb

        self._wandb.log({name: wandb.Image(str(path))})

    def log_text(self, name: str, text: str) -> None:
        if self._wandb is None:
            return
        import wandb

        self._wandb.log({name: wandb.Html(f"<pre>{text}</pre>")})

    def finish(self, status: str = "completed", error: Optional[BaseException] = None) -> None:
        self.metrics["status"] = status
        self.metrics["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        if error is not None:
            self.metrics["error"] = {
                "type": type(error).__name__,
                "message": str(error),
                "traceback": "".join(traceback.format_exception(error))[-4000:],
            }
        self._write()
        if self._wandb is not None:
            self._wandb.summary["status"] = status
            self._wandb.finish(exit_code=0 if status == "completed" else 1)
            self._wandb = None
