"""prunelab entry point: compose the config, validate it, run one task, return the sweep metric.

    python run.py                                   # prune SmolLM2 (taylor, ratio 0.25), evaluate, save
    python run.py pruner=l2 ratio=0.3 layers=all    # any group option / key from conf/
    python run.py task=evaluate model=/path/to/ckpt eval=zeroshot
    python run.py -m ratio=0.1,0.2,0.3 pruner=taylor,l1      # multirun sweep
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PRUNELAB_ROOT", str(ROOT))
# Offline by construction: nothing is fetched from a hub at run time.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from core.config import ConfigError, register_configs, validate  # noqa: E402

log = logging.getLogger("prunelab")
register_configs()

def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input: reported as one clear line, no traceback."""
    from core.data import DataError
    from core.models import LoadError
    from pruning.llm_pruner import PruneError

    return (ConfigError, LoadError, PruneError, DataError, FileNotFoundError, FileExistsError)


def rewrite_model_args(argv: list[str], conf_dir: Path = ROOT / "conf") -> list[str]:
    """``model=<path>`` (not an option of conf/model/) -> ``model=hf model.path=<path>``."""
    options = {p.stem for p in (conf_dir / "model").glob("*.yaml")}
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key == "model" and value not in options and ("/" in value or Path(value).exists()):
            out += ["model=hf", f"model.path={Path(value).expanduser().resolve()}", f"model.name={Path(value).name}"]
        else:
            out.append(arg)
    return out


def _dispatch(task: str):
    if task == "prune":
        from pruning.task import run_prune

        return run_prune
    if task in ("evaluate", "table"):
        from analysis import eval_tasks

        return eval_tasks.run_evaluate if task == "evaluate" else eval_tasks.run_table
    from analysis import analyze_tasks

    return analyze_tasks.run_analyze if task == "analyze" else analyze_tasks.run_batch_analyze


def run(cfg: DictConfig) -> float | None:
    """Validate, run ``cfg.task`` in the Hydra run dir, record the outcome in metrics.json."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from core.models import set_mmap_threshold, set_threads
    from core.runlog import RunContext

    run_dir = Path(cfg.paths.output_dir)
    task = getattr(cfg.task, "value", str(cfg.task))
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    ctx = None
    try:
        errors = validate(cfg)
        if errors:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
        if (run_dir / "metrics.json").exists():
            raise FileExistsError(f"{run_dir} already holds a run; runs never overwrite each other")
        set_threads(cfg.runtime.threads)
        set_mmap_threshold(cfg.runtime.mmap_threshold_mb)
        container = OmegaConf.to_container(cfg, resolve=True)
        ctx = RunContext(run_dir, task=task, config=container, logger=cfg.logger.name,
                         wandb_project=cfg.logger.project, wandb_mode=cfg.logger.mode,
                         wandb_group=cfg.logger.group, wandb_tags=list(cfg.logger.tags))
        ctx.log("config", container)
        result = _dispatch(task)(cfg, ctx)
        ctx.finish("completed")
        log.info("run dir: %s", run_dir.resolve())
        return result
    except BaseException as e:  # noqa: BLE001 - every failure is recorded in metrics.json
        if ctx is None:
            ctx = RunContext(run_dir, task=task, logger="none")
        ctx.finish("failed", e)
        if isinstance(e, _user_errors()):
            log.error("%s", e)
            if multirun:
                return None  # one bad job must not kill the sweep
            raise SystemExit(1) from None
        log.exception("run failed")
        if multirun:
            return None
        raise


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    sys.argv = [sys.argv[0]] + rewrite_model_args(sys.argv[1:])
    main()
