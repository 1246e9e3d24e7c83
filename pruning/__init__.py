"""Pruning methods: each one a callable dataclass, ``pruner(model, calibration) -> PruneResult``.

A pruner's option file ``conf/pruner/<name>.yaml`` names its class with ``_target_``; its fields are the
option's keys, bound by ``hydra.utils.instantiate`` before any weight loads (an unknown key is a
``TypeError`` there, a bad value a :class:`~core.run.errors.ConfigError` from ``__post_init__``). The package
takes plain arguments only (a model, a token tensor) and imports ``core``, never a sibling package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Protocol, runtime_checkable

from core.run.errors import UserError

if TYPE_CHECKING:  # a pruner's options bind (config validation) without importing torch
    import torch
    from torch import nn


class PruneError(UserError, ValueError):
    """A pruning request that cannot be honoured for this model; raised before the model is modified."""


@dataclass
class PruneResult:
    """What a pruner did, in the run record's terms."""

    params_before: int
    params_after: int
    # What was compressed in which unit, e.g. {"unit": "groups", "amount": 0.25}: the unit is the pruner's
    # ratio_target (a key of its RATIO), so the results table never compares a group ratio with a sparsity.
    compression: dict[str, Any]
    ranges: dict[str, list[int]] = field(default_factory=dict)  # {"attention": [start, end), "mlp": [...]}
    layers: list[dict] = field(default_factory=list)  # per-layer widths before/after
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # method-specific settings, for the record
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.params_after / self.params_before


@runtime_checkable
class Pruner(Protocol):
    """The interface every ``conf/pruner/*.yaml`` target implements."""

    # What `ratio` means, per `ratio_target` unit: {unit: one line}, the first the default (docs/options.md's
    # table is generated from these). A pruner resolves ratio_target None to its default while it is built, and
    # refuses a unit it cannot honour with these options (pruning.options.resolve_ratio_target).
    RATIO: ClassVar[dict[str, str]]
    name: str  # the method's label in records and tables
    ratio_target: str  # the unit `ratio` is read in, resolved: what the record says

    @property
    def needs_calibration(self) -> bool: ...

    def check(self, depth: int) -> None:
        """Raise :class:`PruneError` for a request this model (of ``depth`` layers) cannot take; no weights needed."""

    def __call__(self, model: nn.Module, calibration: Optional[torch.Tensor]) -> PruneResult:
        """Prune ``model`` in place; ``calibration`` is ``[num_samples, seq_len]`` token ids (or None)."""
