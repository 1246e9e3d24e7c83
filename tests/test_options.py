"""Per-option contract: every option of every config group composes; every pruner runs on the tiny model and
its checkpoint reloads with identical logits; every recipe a sweep can run records its optimised metric."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, compose, run_task

GROUPS = ("model", "data", "pruner", "layers", "eval", "logger", "experiment", "paths", "replacement", "search",
          "recovery", "export")
PRUNERS = sorted(p.stem for p in (ROOT / "conf" / "pruner").glob("*.yaml"))


@pytest.mark.parametrize("group,name", [(g, p.relative_to(ROOT / "conf" / g).with_suffix("").as_posix())
                                        for g in GROUPS for p in sorted((ROOT / "conf" / g).rglob("*.yaml"))])
def test_every_option_composes(group, name, tmp_path):
    cfg = compose([f"{group}={name}"], tmp_path)
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_presets_win_over_the_defaults(tmp_path):
    """An experiment's top-level keys override config.yaml's (it comes after _self_): task, ratio, run_name."""
    cfg = compose(["experiment=baselines/base"], tmp_path)
    assert cfg.task == "evaluate" and cfg.run_name == "base"
    cfg = compose(["experiment=baselines/wanda"], tmp_path)
    assert (cfg.pruner.name, cfg.ratio, cfg.run_name, cfg.layers.name) == ("wanda", 0.2, "Wanda_2000", "all")
    cfg = compose(["experiment=baselines/wanda", "ratio=0.5"], tmp_path)
    assert cfg.run_name == "Wanda_5000"
    assert compose(["experiment=baselines/shortgpt"], tmp_path).run_name == "ShortGPT_remove_7"



@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_runs_and_round_trips(name, tiny, calib, tmp_path):
    from core.models.checkpoint import save_checkpoint
    from core.models.load import load_model
    from core.models.ref import ModelRef
    from pruning import Pruner, PruneResult
    from recipes._common import build

    cfg = compose([f"pruner={name}", "model=tiny", "layers=all", "ratio=0.5"], tmp_path)
    pruner = build(cfg.pruner, "pruner")
    assert isinstance(pruner, Pruner) and pruner.name == name
    model, tok = tiny
    pruner.check(len(model.model.layers))
    result = pruner(model, calib if pruner.needs_calibration else None)
    assert isinstance(result, PruneResult)
    # the record's unit is the one the pruner read `ratio` in: a unit it declares
    assert result.compression["unit"] == pruner.ratio_target in type(pruner).RATIO
    # structured methods remove parameters; masks (unit "sparsity") zero them in dense shapes and remove none
    assert result.params_after < result.params_before or (
        result.compression["unit"] == "sparsity" and result.compression["amount"] > 0)
    assert {"unit", "amount"} <= set(result.compression)
    out = save_checkpoint(model, tok, tmp_path / "model", {"method": name})
    loaded, _ = load_model(ModelRef.at(out), cache_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib).logits, model(calib).logits, rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [("+pruner.tayl=3", "pruner.tayl: not an option of pruning.llm_pruner.LLMPruner"),
                                       ("pruner.rounding=up", "pruner.rounding='up' is not one of")])
def test_pruner_typos_fail_before_loading(bad, match, tmp_path):
    with pytest.raises(SystemExit):
        run_task(["model=hf", "model.path=/nonexistent", "pruner=taylor", bad, "logger=none"], tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "failed" and match in m["error"]["message"], m["error"]["message"]


def test_prune_and_evaluate_record_the_optimised_metric(tmp_path):
    fast = ["model=tiny", "pruner=taylor", "layers=all", "logger=none", "ratio=0.5", "eval.ppl.max_tokens=512",
            "eval.generation.enabled=false"]
    value, m = run_task(fast, tmp_path / "prune")
    assert m["optimized_metric"] == {"name": "ppl", "direction": "minimize", "value": value}
    assert value == m["eval"]["pruned"]["ppl"]["value"] and m["compression"]["unit"] == "groups"
    value, m = run_task(["task=evaluate", f"model={tmp_path / 'prune' / 'model'}", "logger=none",
                         "eval.ppl.max_tokens=512", "eval.generation.enabled=false", "optimized_metric.name=ppl"],
                        tmp_path / "eval")
    assert m["optimized_metric"] == {"name": "ppl", "direction": "minimize", "value": value}
    assert value == m["eval"]["model"]["ppl"]["value"] and m["compression"]["unit"] == "groups"


@pytest.mark.parametrize("overrides,match", [
    (["optimized_metric.name=accuracy"], "optimized_metric.name='accuracy': task=prune reports ppl"),
    (["optimized_metric.direction=maximize"], "ppl is to minimize, not maximize"),
])
def test_optimized_metric_is_checked(overrides, match, tmp_path):
    with pytest.raises(SystemExit):
        run_task(["model=tiny", "pruner=taylor", "logger=none", "eval=none", *overrides], tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert match in m["error"]["message"], m["error"]["message"]


def test_the_default_pruner_is_the_compensated_one(tmp_path):
    """`python run.py` prunes with pruner=obs (issue 13: the best method within minutes on SmolLM2): 25% of all
    parameters, calibration sized by the token rule (tokens=auto), refitted towards the dense model; LLM-Pruner stays
    pruner=taylor."""
    cfg = compose([], tmp_path)
    assert cfg.pruner._target_ == "pruning.obs.pruner.StructuredOBS"
    from recipes._common import build

    pruner = build(cfg.pruner, "pruner")  # ratio_target: null at the top level, resolved by the class
    assert (pruner.ratio, pruner.ratio_target, pruner.tokens, pruner.target) == (0.25, "params", "auto", "dense")
    assert compose(["pruner=taylor"], tmp_path).pruner._target_ == "pruning.llm_pruner.LLMPruner"


# --------------------------------------------------------------------------- one meaning per option, stated once


def _option_keys(path) -> tuple[dict, dict]:
    """(the keys of an option file after its ``defaults:`` chain inside its group, e.g. l1 -> taylor, lora_cpu10 ->
    lora; the keys the file itself sets on top of a chain, {} without one), uninterpolated."""
    from omegaconf import OmegaConf

    own = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    chain = [d for d in own.pop("defaults", []) if isinstance(d, str) and (path.parent / f"{d}.yaml").is_file()]
    merged: dict = {}
    for d in chain:
        merged.update(_option_keys(path.parent / f"{d}.yaml")[0])
    return {**merged, **own}, own if chain else {}


OPTION_FILES = [p for p in sorted((ROOT / "conf").rglob("*.yaml")) if p.parent != ROOT / "conf"
                and "hydra" not in p.relative_to(ROOT / "conf").parts and "_target_" in _option_keys(p)[0]]


def _literal(v) -> bool:
    return not (isinstance(v, str) and ("${" in v or v == "???")) and not (
        isinstance(v, dict) and not all(_literal(x) for x in v.values()))


@pytest.mark.parametrize("path", OPTION_FILES, ids=lambda p: p.relative_to(ROOT / "conf").with_suffix("").as_posix())
def test_defaults_are_stated_once(path):
    """Every key of an option file is a field of its `_target_` class, and a literal value there is the class's own
    default (read after the class has built both, so `[q, k]` and `("q", "k")` agree): a default is stated once, the
    YAML showing it. A preset on a defaults chain (l1 -> taylor, lora_cpu10 -> lora) differs in its own keys only."""
    import dataclasses

    from hydra.utils import get_class

    keys, own = _option_keys(path)
    cls = get_class(keys.pop("_target_"))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(keys) - set(fields))
    assert not unknown, f"{path.relative_to(ROOT)}: {unknown} are not fields of {cls.__name__}"
    required = {k: "x" for k, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    default = cls(**required)
    bad = []
    for key, value in keys.items():
        if key in own or key in required or not _literal(value):
            continue
        try:
            same = getattr(cls(**{**required, key: value}), key) == getattr(default, key)
        except Exception:  # noqa: BLE001 - a value the class refuses on its own is a disagreement too
            same = False
        if not same:
            bad.append(f"{key}: YAML {value!r}, class {getattr(default, key)!r}")
    assert not bad, f"{path.relative_to(ROOT)} disagrees with {cls.__name__}: " + "; ".join(bad)


def _pruner_classes() -> dict:
    from hydra.utils import get_class

    return {name: get_class(_option_keys(ROOT / "conf" / "pruner" / f"{name}.yaml")[0]["_target_"]) for name in PRUNERS}


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_declares_what_ratio_means(name, tmp_path):
    """RATIO: {ratio_target unit: one line}, the first the default; the option file passes the top-level
    `ratio_target` (null), which the class resolves to one of its units."""
    from recipes._common import build

    cls = _pruner_classes()[name]
    assert cls.RATIO and all(isinstance(u, str) and isinstance(m, str) and m and "\n" not in m
                             for u, m in cls.RATIO.items())
    cfg = compose([f"pruner={name}"], tmp_path)
    assert cfg.ratio_target is None and cfg.pruner.ratio_target is None  # one source: the top level
    assert build(cfg.pruner, "pruner").ratio_target == next(iter(cls.RATIO))


@pytest.mark.parametrize("target,kwargs,unit", [
    ("pruning.llm_pruner.LLMPruner", {}, "groups"),
    ("pruning.llm_pruner.LLMPruner", {"ratio_target": "params"}, "params"),
    ("pruning.magnitude.Magnitude", {}, "sparsity"),
    ("pruning.magnitude.Magnitude", {"pattern": "structured"}, "groups"),
    ("pruning.wanda.Wanda", {"pattern": "2:4"}, "sparsity"),
    ("pruning.wanda.Wanda", {"pattern": "structured"}, "groups"),
    ("pruning.flap.FLAP", {}, "prunable_params"),
    ("pruning.flap.FLAP", {"structure": "UL-UM"}, "groups"),
    ("pruning.shortgpt.ShortGPT", {}, "params"),
    ("pruning.shortgpt.ShortGPT", {"num_layers": 2}, "layers"),
    ("pruning.shortgpt.ShortGPT", {"num_layers": 2, "granularity": "sublayer"}, "sublayers"),
    ("pruning.slicegpt.SliceGPT", {}, "slicing"),
    ("pruning.obs.pruner.StructuredOBS", {}, "params"),
    ("pruning.obs.pruner.StructuredOBS", {"ratio_target": "groups"}, "groups"),
])
def test_ratio_target_null_is_the_unit_the_options_imply(target, kwargs, unit):
    from hydra.utils import get_class

    p = get_class(target)(**kwargs)
    assert p.ratio_target == unit and unit in type(p).RATIO


def test_the_ratio_table_is_built_from_the_classes():
    from pruning.options import ratio_table

    classes = _pruner_classes()
    table = ratio_table(classes)
    rows = [line for line in table.splitlines()[2:]]
    assert len(rows) == sum(len(cls.RATIO) for cls in set(classes.values()))
    for cls in set(classes.values()):
        assert f"`{cls.__module__}.{cls.__qualname__}`" in table
        first, *rest = cls.RATIO
        assert f"| `{first}` (default) |" in table and all(f"| `{u}` |" in table for u in rest)
    assert "`taylor`" in table and "`l1`" in table


@pytest.mark.parametrize("overrides,match", [
    (["pruner=wanda", "ratio_target=params"], "ratio_target='params' is not supported by pruner=wanda"),
    (["pruner=slicegpt", "ratio_target=groups"], "ratio_target='groups' is not supported by pruner=slicegpt"),
    (["pruner=flap", "ratio_target=groups"], "ratio_target=groups cannot be honoured by pruner=flap here: it needs "
                                             "structure=UL-UM"),
    (["pruner=obs", "ratio_target=sparsity"], "pruner.ratio_target='sparsity' is not one of params, groups"),
    (["pruner=magnitude", "pruner.pattern=structured", "ratio_target=sparsity"],
     "ratio_target=sparsity cannot be honoured by pruner=magnitude here: pattern=structured"),
    (["pruner=magnitude", "ratio_target=groups"], "ratio_target=groups cannot be honoured by pruner=magnitude here"),
    (["pruner=shortgpt", "pruner.num_layers=2", "ratio_target=params"],
     "pruner.num_layers=2 fixes how many units go, so `ratio` is unused"),
    (["pruner=shortgpt", "ratio_target=layers"], "it counts removed units: set pruner.num_layers=n"),
    # other values these options would not read (issue 25: an option that cannot take effect is an error)
    (["pruner=wanda", "pruner.pattern=2:4", "pruner.attention_ratio=0.3"],
     "pruner.attention_ratio=0.3 cannot be honoured with pattern=2:4"),
    (["pruner=magnitude", "pruner.pattern=4:8", "pruner.scope=row"],
     "pruner.scope='row' applies to pattern=unstructured only, not 4:8"),
    (["pruner=wanda", "pruner.rounding=nearest"], "pruner.rounding='nearest' applies to pattern=structured only"),
    (["pruner=magnitude", "pruner.norm=l1"], "pruner.norm=l1 applies to pattern=structured only"),
    (["pruner=taylor", "pruner.batch_size=4"], "pruner.batch_size=4 applies to taylor=vectorize | param_first only"),
])
def test_a_value_a_pruner_cannot_honour_fails_before_loading(overrides, match, tmp_path):
    with pytest.raises(SystemExit):
        run_task(["model=hf", "model.path=/nonexistent", "logger=none", *overrides], tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "failed" and match in m["error"]["message"], m["error"]["message"]


@pytest.mark.parametrize("overrides,unit", [([], "params"), (["ratio_target=groups"], "groups")])
def test_the_record_holds_the_unit_the_pruner_used(overrides, unit, tmp_path):
    """A default prune (pruner=obs) reads `ratio` as a share of all parameters, and every file of the run says so
    in plain form: metrics.json (config, compression, the table's row), checkpoint_info.json and the model card.
    `ratio_target=groups` is honoured, not ignored."""
    import re

    from analysis.results_table import rows_from_metrics

    _, m = run_task(["model=tiny", "layers=all", "logger=wandb", "pruner.tokens=4096", "pruner.seq_len=64",
                     "eval.ppl.max_tokens=512", "eval.generation.enabled=false", *overrides], tmp_path)
    assert m["status"] == "completed", m.get("error")
    info = json.loads((tmp_path / "model" / "checkpoint_info.json").read_text())
    for record in (m, info):
        assert (record["config"]["ratio_target"], record["config"]["pruner"]["ratio_target"]) == (unit, unit)
        assert record["compression"]["unit"] == unit
    assert info["ratio_target"] == unit and info["ratio"] == 0.25 and info["method"] == "obs"
    assert rows_from_metrics(m, str(tmp_path))[-1]["unit"] == unit
    files = list(tmp_path.rglob("*.json"))
    assert len(files) >= 5
    for path in files:  # no enum repr anywhere: neither RatioTarget.groups nor <RatioTarget.groups: 'groups'>
        text = path.read_text()
        assert "RatioTarget" not in text and not re.search(r"<\w+(\.\w+)*: ", text), path
    card = tmp_path / "model" / "README.md"
    if card.exists():
        lines = [line for line in card.read_text().splitlines() if "ratio_target" in line]
        assert lines and all(unit in line and "RatioTarget" not in line for line in lines), lines
