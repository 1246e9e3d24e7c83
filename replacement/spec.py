"""Options of the ``replacement`` and ``search`` config groups, checked when bound (before any weight loads).

``conf/replacement/*.yaml`` names :class:`ReplacementSpec`, ``conf/search/*.yaml`` names :class:`SearchSpec`;
their fields are the groups' keys (an unknown key or a bad value fails at binding, one line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from core.models.ref import DTYPE_NAMES
from core.run.errors import ConfigError

STRATEGIES = ("evolve", "ga", "score_topk", "random", "exhaustive")
# SearchSpec.footprint(): float32 [seq, vocab] terms of one row's fitness alive at once (replacement/fitness.py: the
# row's logits as float32, the donor's log-probabilities, their exp, the log-softmax)
FITNESS_ROW_TENSORS = 4
FITNESS = {"kl": "KL(donor || hybrid) per token, lower is better",
           "ppl": "perplexity of the hybrid on the calibration tokens, lower is better",
           "lm_eval": "1 - accuracy on an lm-eval task (search.task, search.limit), lower is better"}


_README = """Hybrid model made by prunelab ({task})

base:  {base}
donor: {donor}
replaced layers (taken from the donor): {layers}
{description}
Load it anywhere (torch + transformers only, no prunelab):

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained("{path}", trust_remote_code=True)

Test it (generation check + a limited MMLU) with prunelab:

    python run.py task=evaluate model={path} eval=mmlu eval.limit=50 eval.generation.enabled=true

checkpoint_info.json holds the layers, the scores measured by the run, the base, the donor and the full config.
"""


def hybrid_readme(base: str, donor: str, layers: list[int], path: Any, description: str = "",
                  task: str = "task=replace") -> str:
    """The seed's ``README.txt`` beside a hybrid (task=replace, and task=search's best hybrids): what it is made of,
    how to load it without prunelab, how to test it."""
    return _README.format(task=task, base=base, donor=donor, layers=list(layers), path=path,
                          description=f"description: {description}\n" if description else "")


@dataclass(frozen=True)
class ReplacementSpec:
    """The base model with the donor's decoder layers at ``layers``."""

    base: str  # a model name of conf/model/ or a checkpoint path
    donor: str = "smollm2"
    layers: list[int] = field(default_factory=list)  # decoder indices taken from the donor
    description: str = ""
    donor_device: Optional[str] = None  # where donor layers wait while not swapped in (null: the model's device)
    # Where the base (and so the hybrid) lives. null: a base named by a conf/model/ option keeps that option's
    # dtype/device; a base given as a path loads in its checkpoint's own dtype (config.json's torch_dtype) on CUDA
    # when present (auto). A value here overrides both.
    dtype: Optional[str] = None  # float32 | float16 | bfloat16 | auto
    device: Optional[str] = None  # cpu | cuda | cuda:N | auto
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
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"replacement.dtype={self.dtype}: one of {', '.join(DTYPE_NAMES)} (null: the base's own)")
        if self.score is not None and not self.score_metric:
            raise ConfigError("replacement.score needs replacement.score_metric (the metric's name, e.g. mmlu)")

    def footprint(self, cfg: dict, tokens: int, dtype: str, device: str, *, donor_cfg: Optional[dict] = None) -> Any:
        """Peak memory of building the hybrid (task=replace) for a base of ``config.json`` ``cfg`` (torch-free;
        core/run/plan.py): the base's weights where the base is, and the donor's layers at ``layers`` (read from its
        safetensors one layer at a time, cast to the base's dtype) where ``donor_device`` says; the base's layers
        they replace are freed once swapped."""
        from core.run.plan import Placement, accelerator, layer_bytes, model_bytes

        donor = donor_cfg or cfg
        where = self.donor_device or device
        layers = sum(layer_bytes(donor, i, dtype) for i in self.layers if i < int(donor["num_hidden_layers"]))
        p = Placement({"base weights": model_bytes(cfg, dtype)}, {}, accelerator(device), str(device))
        (p.work if accelerator(where) == accelerator(device) else p.host)["donor layers"] = layers
        return p.footprint(removes=[f"layers {sorted(self.layers)} of {self.base} replaced by {self.donor}'s"
                                    + ("" if donor_cfg else " (donor sizes taken from the base's config)")])


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
    # ga / evolve (core/search.py): population size (ga), children per generation (ga; evolve's lambda), ga's
    # tournament size and mutation probability, and layer sets to start from (each used for the k of its length)
    population: int = 16
    offspring: int = 8
    tournament: int = 3
    mutation: float = 0.5
    initial: list[list[int]] = field(default_factory=list)

    def initial_for(self, k: int) -> list[list[int]]:
        """The ``initial`` sets of ``k`` layers (the others serve other k)."""
        return [list(c) for c in self.initial if len(c) == k]

    def __post_init__(self) -> None:
        errors = []
        if self.population < 2 or self.offspring < 1 or self.tournament < 1 or not 0.0 <= self.mutation <= 1.0:
            errors.append(f"search.population={self.population} (>= 2), offspring={self.offspring} (>= 1), "
                          f"tournament={self.tournament} (>= 1), mutation={self.mutation} (in [0, 1])")
        bad = [c for c in self.initial if not c or any(not isinstance(i, int) or isinstance(i, bool) or i < 0
                                                       for i in c) or len(set(c)) != len(c)]
        if bad:
            errors.append(f"search.initial: {bad} are not sets of distinct layer indices")
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

    def footprint(self, cfg: dict, tokens: int, dtype: str, device: str, *, donor_cfg: Optional[dict] = None,
                  donor_dtype: Optional[str] = None, donor_device: Optional[str] = None, seq_len: int = 128) -> Any:
        """Peak memory and work of the search (task=search) for a base of ``config.json`` ``cfg`` (torch-free;
        core/run/plan.py), as replacement/fitness.py holds it: the base's weights; for ``fitness=kl`` the whole
        donor model while its log-probabilities are computed (float16 ``[rows, seq_len - 1, vocab]``, kept on the
        host); the prefix cache (the base's hidden states at every layer input for every calibration row, on the
        host); every donor layer once the donor's own fitness has been measured (where ``donor_device`` says); one
        batch of 4 rows through the model (building the prefix cache: every layer's output of that batch, and their
        stacked copy) and ONE row's logits with :data:`FITNESS_ROW_TENSORS` float32 ``[seq, vocab]`` terms at a
        time. ``tokens``: the search's full-fidelity tokens (``search.tokens``)."""
        from core.run.plan import (Placement, accelerator, dtype_bytes, hidden_bytes, layer_bytes,
                                   layer_forward_bytes, model_bytes)

        donor = donor_cfg or cfg
        depth = int(cfg["num_hidden_layers"])
        rows = max(1, -(-int(tokens or self.tokens) // int(seq_len)))
        t = rows * int(seq_len)
        where = donor_device or device
        same = accelerator(where) == accelerator(device)
        batch = min(4, rows)
        forward = (2 * (depth + 1) * hidden_bytes(batch * int(seq_len), cfg, dtype)
                   + layer_forward_bytes(batch, int(seq_len), cfg, dtype)
                   + int(seq_len) * int(cfg["vocab_size"]) * (dtype_bytes(dtype, cfg) + 4 * FITNESS_ROW_TENSORS))
        layers = sum(layer_bytes(donor, i, dtype) for i in range(int(donor["num_hidden_layers"])))
        host: dict[str, int] = {}
        work = {"base weights": model_bytes(cfg, dtype), "one batch through the model, one row's logits": forward}
        targets = t * int(cfg["vocab_size"]) * 2 if self.fitness == "kl" else 0
        prefix = depth * hidden_bytes(t, cfg, dtype) if self.prefix_cache and self.fitness != "lm_eval" else 0
        if targets:
            host["donor log-probabilities (float16)"] = targets
        if prefix:
            host["prefix cache (hidden states at every layer)"] = prefix
        search_side = {"all donor layers": layers}
        setup_side = {"whole donor model (for the KL targets)": model_bytes(donor, donor_dtype or dtype)
                      if self.fitness == "kl" else 0}
        side = max((search_side, setup_side), key=lambda d: sum(d.values()))
        (work if same else host).update({k: v for k, v in side.items() if v})
        p = Placement(work, host, accelerator(device), str(device))
        evaluations = self.budget * len(self.k) * len(self.strategies)
        forwards = evaluations * depth + 2 * depth  # each evaluation at most one base forward; prefix and donor passes
        return p.footprint(layer_forwards=forwards, tokens=t, removes=[
            f"searches which k of the base's {depth} layers to take from the donor, k in {list(self.k)}, by "
            f"{', '.join(self.strategies)} with a budget of {self.budget} {self.fitness} evaluations each "
            f"({evaluations} in all, full-fidelity equivalents)"],
            notes=["lm_eval fitness: lm-eval's own batches are not counted"] if self.fitness == "lm_eval" else [])

    def levels(self) -> list[int]:
        return list(self.fidelities) if self.fidelities else sorted({max(1, self.tokens // 8), max(1, self.tokens // 2),
                                                                     self.tokens})
