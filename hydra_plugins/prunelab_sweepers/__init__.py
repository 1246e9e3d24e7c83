"""prunelab's Hydra sweepers (Hydra instantiates sweepers only from the ``hydra_plugins`` namespace), named by
conf/hydra/sweeper/*.yaml.

``OptunaStudy`` is hydra-optuna-sweeper's ``OptunaSweeper`` except at the end of a study in which no trial
completed: the plugin then dies in ``study.best_trial`` with a traceback, before Hydra's end-of-sweep callback.
Here the study ends normally, so ``RunGuard.on_multirun_end`` lists every failed trial with its one-line error
and exits 1, as for any sweep. Hydra imports this module at every start to discover plugins: it stays empty when
hydra-optuna-sweeper is not installed (run.py then names the package if a sweep asks for it).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pragma: no cover - the plugin is a dependency; without it there is nothing to extend
    OptunaSweeper = None



def _from_best_trial(error: BaseException) -> bool:
    """Whether ``error`` is optuna's "no completed trial" from ``Study.best_trial`` (in-memory storage says "No
    trials are completed yet", SQLite storage "Record does not exist")."""
    import traceback

    return any(frame.name in ("best_trial", "get_best_trial") for frame in traceback.extract_tb(error.__traceback__))


if OptunaSweeper is not None:

    class OptunaStudy(OptunaSweeper):
        def sweep(self, arguments: list[str]) -> Any:
            try:
                return super().sweep(arguments)
            except ValueError as e:
                if not _from_best_trial(e):
                    raise
                log.error("optuna study: no trial completed, so there is no best trial (each job's error is in "
                          "the sweep summary below)")
                return None
