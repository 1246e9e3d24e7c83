"""Options of the ``replacement`` and ``search`` config groups, checked when bound (before any weight loads).

``conf/replacement/*.yaml`` names :class:`ReplacementSpec`, ``conf/search/*.yaml`` names :class:`SearchSpec`;
their fields are the groups' keys (an unknown key or a bad value fails at binding, one line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from core.errors import ConfigError

STRATEGIES = ("evolve", "ga", "score_topk", "random", "exhaustive")
FITNESS = {"kl": "KL(donor || hybrid) per token, lower is better",
           "ppl": "perplexity of the hybrid on the calibration tokens, lower is better",
           "lm_eval": "1 - accuracy on an lm-eval task (search.task, search.limit), lower is better"}


@dataclass(frozen=True)
class ReplacementSpec:
    """The base model with the donor's decoder layers at ``layers``."""

    base: str  # a model name of conf/model/ or a checkpoint path
    donor: str = "smollm2"
    layers: list[int] = field(default_factory=list)  # decoder indices taken from the donor
    description: str = ""
    donor_device: Optional[str] = None  # where donor layers wait while not swapped in (null: the model's device)
    score: Optional[float] = None  # a score measured elsewhere (e.g. by a search), recorded as given
    score_metric: Optional[str] = None  # its name, e.g. "mmlu"

    def __post_init__(self) -> None:
        if not self.base or not self.donor:
            raise ConfigError("replacement.base and replacement.donor must name a model (conf/model/) or a path")
        bad = [i for i in self.layers if not isinstance(i, int) or isinstance(i, bool) or i < 0]
        if bad:
            raise ConfigError(f"replacement.layers: {bad} are not layer indices (integers >= 0)")
        dup = sorted({i for i in self.layers if self.layers.count(i) > 1})
        if dup:
            raise ConfigError(f"replacement.layers: layer(s) {dup} given more than once")
        if self.score is not None and not self.score_metric:
            raise ConfigError("replacement.score needs replacement.score_metric (the metric's name, e.g. mmlu)")


@dataclass(frozen=True)
class SearchSpec:
    """For each k in ``k``: which k layers to take from the donor, by ``strategies`` at ``budget`` evaluations."""

    k: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    strategies: list[str] = field(default_factory=lambda: ["evolve"])
    budget: int = 64  # fitness evaluations per k and strategy, in full-fidelity equivalents
    fitness: str = "kl"  # kl | ppl | lm_eval
    tokens: int = 2048  # calibration tokens at full fidelity (rows of data.seq_len)
    fidelities: Optional[list[int]] = None  # evolve's token levels; null: tokens/8, tokens/2, tokens
    task: Optional[str] = None  # fitness=lm_eval: the lm-eval task (e.g. mmlu)
    limit: Optional[int] = None  # fitness=lm_eval: examples per task
    seed: int = 0
    resume: Optional[str] = None  # null | "latest" | a killed search's run dir
    save_best: bool = False  # save each k's best hybrid as a checkpoint
    prefix_cache: bool = True  # reuse the base's hidden states up to a candidate's first swapped layer

    def __post_init__(self) -> None:
        errors = []
        if not self.k or any(not isinstance(k, int) or k <= 0 for k in self.k):
            errors.append(f"search.k={self.k}: each k must be a positive number of layers")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if not self.strategies or unknown:
            errors.append(f"search.strategies: {unknown or 'none'} not in {', '.join(STRATEGIES)}")
        if self.fitness not in FITNESS:
            errors.append(f"search.fitness={self.fitness!r} is not one of {', '.join(FITNESS)}")
        if self.fitness == "lm_eval" and not self.task:
            errors.append("search.fitness=lm_eval needs search.task=<an lm-eval task, e.g. mmlu>")
        if self.budget < 1 or self.tokens < 2:
            errors.append("search.budget must be >= 1 and search.tokens >= 2")
        if self.fidelities is not None and (sorted(self.fidelities) != list(self.fidelities)
                                            or self.fidelities[-1] != self.tokens or self.fidelities[0] < 1):
            errors.append(f"search.fidelities={self.fidelities} must increase and end at search.tokens={self.tokens}")
        if errors:
            raise ConfigError("; ".join(errors))

    def levels(self) -> list[int]:
        return list(self.fidelities) if self.fidelities else sorted({max(1, self.tokens // 8), max(1, self.tokens // 2),
                                                                     self.tokens})
