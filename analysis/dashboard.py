"""The W&B comparison view of a sweep, as code: a workspace view built with ``wandb-workspaces``.

    python -m analysis.dashboard --entity E --project prunelab --group sweep-2026-11-24_10-00-00   # print it (JSON)
    python -m analysis.dashboard --entity E --project prunelab --group sweep-... --save            # create the view

Building and printing need no network and no login; ``--save`` needs ``wandb login`` and the runs synced
(``wandb sync <sweep dir>/*/wandb/offline-run-*``). The runs are those of one W&B group (a sweep's, see
``core.run.wandb_view.sweep_group``; none: every run of the project), grouped by ``method`` so that every panel colours
runs by method (W&B gives the runs of a group one colour). Sections:

- Pareto: ``ppl/pruned`` (log scale) and ``zeroshot/avg`` against ``params/kept_frac``, one point per run;
- Per-layer sparsity: ``analysis/layer_totals/sparsity`` against ``analysis/layer_totals/layer_idx`` (a line per
  method), the ``analysis/sparsity`` plot of each run and the per-module ``analysis/layers`` table;
- Results: the ``eval/results`` table (per lm-eval task) beside the runs table, whose pinned columns are
  method, ratio, layer range, perplexity (pruned, base), parameters kept and zero-shot average.

Every key is a name ``core.run.record`` emits (``SUMMARY_NAMES``, ``per_layer_key``, ``EVAL_TABLE``); the tests fail
if they drift apart. No report (``wandb_workspaces.reports.v2``) is built: its runsets look the project up on
the server even to be printed, so it could not be checked offline; the saved view can be shared as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from core.run.wandb_view import EVAL_TABLE, per_layer_key

PARETO_X = "params/kept_frac"
PARETO_Y = ("ppl/pruned", "zeroshot/avg")
LAYER_TABLE = "analysis/layer_totals"  # analysis/report.py: one row per layer (totals over its modules)
LAYER_X = per_layer_key(LAYER_TABLE, "layer_idx")
LAYER_Y = per_layer_key(LAYER_TABLE, "sparsity")
MODULE_TABLE = "analysis/layers"  # analysis/report.py: layers.csv, one row per layer x module
SPARSITY_IMAGE = "analysis/sparsity"  # analysis/report.py: sparsity.png
GROUP_BY = "method"  # a config key every run has (core.run.wandb_view.derived_config)
CONFIG_COLUMNS = ("method", "ratio", "layer_range")
SUMMARY_COLUMNS = ("ppl/pruned", "ppl/base", "params/kept_frac", "zeroshot/avg")


def summary_keys() -> list[str]:
    """Every summary key the view reads (each one of ``core.run.wandb_view.SUMMARY_NAMES``)."""
    return sorted({PARETO_X, *PARETO_Y, *SUMMARY_COLUMNS})


def history_keys() -> list[str]:
    """Every history key the view reads: the per-layer series of ``RunContext.log_table``."""
    return [LAYER_X, LAYER_Y]


def media_keys() -> list[str]:
    """The tables and images the view shows."""
    return [MODULE_TABLE, EVAL_TABLE, SPARSITY_IMAGE]


def _pinned_columns() -> list[str]:
    return [f"config:{k}.value" for k in CONFIG_COLUMNS] + [f"summary:{k}" for k in SUMMARY_COLUMNS]


def _sections() -> list[tuple[str, list[Any]]]:
    """(section title, panels) of the workspace."""
    import wandb_workspaces.reports.v2 as wr  # slow, only to build the view; main() reports it missing

    pareto = [wr.ScatterPlot(title=f"{y} vs {PARETO_X}", x=wr.SummaryMetric(PARETO_X), y=wr.SummaryMetric(y),
                             log_y=y.startswith("ppl/") or None)
              for y in PARETO_Y]
    layers = [
        wr.LinePlot(title="sparsity per layer", x=LAYER_X, y=[LAYER_Y], title_x="layer", title_y="sparsity",
                    groupby_aggfunc="mean", groupby_rangefunc="minmax"),
        wr.MediaBrowser(title="sparsity per layer (plot of each run)", media_keys=[SPARSITY_IMAGE]),
        wr.WeavePanelSummaryTable(table_name=MODULE_TABLE, layout=wr.Layout(w=24, h=10)),
    ]
    results = [wr.WeavePanelSummaryTable(table_name=EVAL_TABLE, layout=wr.Layout(w=24, h=10))]
    return [("Pareto: quality vs parameters kept", pareto), ("Per-layer sparsity", layers), ("Results", results)]


def _group_filter(group: Optional[str]) -> list[Any]:
    from wandb_workspaces import expr  # only to build the view; main() reports it missing

    return [expr.Metric("Group") == group] if group else []


def build_workspace(entity: str, project: str, group: Optional[str] = None, name: Optional[str] = None) -> Any:
    """The workspace view (``wandb_workspaces.workspaces.Workspace``); nothing is sent until ``.save()``."""
    import wandb_workspaces.workspaces as ws  # slow, only to build the view; main() reports it missing
    from wandb_workspaces import expr

    return ws.Workspace(
        entity=entity, project=project, name=name or f"prunelab {group or project}",
        sections=[ws.Section(name=title, panels=panels, is_open=True) for title, panels in _sections()],
        runset_settings=ws.RunsetSettings(filters=_group_filter(group), groupby=[expr.Config(GROUP_BY)],
                                          pinned_columns=_pinned_columns()),
    )


def definition(view: Any) -> dict:
    """The JSON spec W&B stores for the workspace view (what ``--save`` sends)."""
    return view._to_model().model_dump(mode="json", by_alias=True, exclude_none=True)  # the library's own wire form


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", default="prunelab", help="W&B project (logger.project)")
    parser.add_argument("--group", default=None, help="W&B group of the sweep (default: every run of the project)")
    parser.add_argument("--name", default=None, help="name of the view / title of the report")
    parser.add_argument("--save", action="store_true", help="create it on W&B (needs `wandb login` and network)")
    args = parser.parse_args(argv)
    try:
        view = build_workspace(args.entity, args.project, args.group, args.name)
    except ImportError as e:
        print(f"error: {e.name or e} is not installed (pip install wandb-workspaces)", file=sys.stderr)
        return 1
    print(json.dumps(definition(view), indent=1))
    if args.save:
        try:
            view.save()
        except Exception as e:  # noqa: BLE001 - network, login, permissions: one line
            print(f"error: not saved to W&B ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  "run `wandb login` first and check --entity/--project", file=sys.stderr)
            return 1
        print(f"saved: {getattr(view, 'url', '')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
