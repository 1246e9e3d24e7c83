"""dry_run=true and the memory check before loading (recipes/_plan.py): the plan is printed and recorded without
reading a weight, a run that cannot fit stops before loading with one line naming the knobs, and every device a
configuration names that this machine lacks is refused in one line before loading."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CACHE_DIR, ROOT, compose, run_task
from core.run import plan as P

TINY = ["model=tiny", "logger=none", "eval=none", "layers=all"]


def cli(args: list[str], run_dir: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"paths.cache_dir={CACHE_DIR}",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=ROOT)


def planned(overrides: list[str], run_dir: Path):
    """The plan run.py would print for these overrides (computed here, in-process)."""
    import run
    from recipes._plan import prepare

    cfg = compose(overrides, run_dir)
    prepared = prepare(cfg, run.check(cfg))
    assert prepared.error is None, prepared.error
    return cfg, prepared.plan


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weight is read."""
    import core.models.load

    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(core.models.load, "load_model", refuse)
    monkeypatch.setattr(core.models.load, "build_tiny", refuse)


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` CUDA devices (0: none) for what the planner asks torch."""
    import torch

    import recipes._common

    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (40 * P.GIB, 80 * P.GIB))
        monkeypatch.setattr(recipes._common, "_no_gpu_files", lambda: n == 0)

    return set_count


# --------------------------------------------------------------------------- dry runs


@pytest.mark.parametrize("shape,fits", [("llama3_70b_shape", False), ("llama3_8b_shape", True)])
def test_dry_run_of_a_full_size_model_on_an_80gb_gpu(tmp_path, shape, fits):
    args = [f"model={shape}", "model.device=cuda", "plan.device_memory=80GB", "dry_run=true"]
    _, plan = planned(args, tmp_path / "expected")
    peak, where = plan.peak()
    assert (peak.device_bytes <= 80 * P.GIB) == fits
    t0 = time.perf_counter()
    proc = cli(args, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 60  # seconds, not the minutes of reading 141 GB
    out = proc.stdout
    depth = 80 if "70b" in shape else 32
    assert f"{depth} layers" in out and "removes:" in out and "calibration:" in out
    assert f"peak             {P.fmt_bytes(peak.device_bytes)} ({where['device']})" in out
    assert "available: device 80.00 GiB (plan.device_memory=80GB)" in out
    assert ("verdict: fits" in out) == fits and ("verdict: does not fit" in out) == (not fits)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "dry_run" and m["plan"]["peak"]["device_bytes"] == peak.device_bytes
    assert m["plan"]["available"]["fits"] == fits
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "wandb").exists()


def test_a_shortened_shape_prints_its_own_plan(tmp_path):
    _, full = planned(["model=llama3_8b_shape", "dry_run=true"], tmp_path / "a")
    _, short = planned(["model=llama3_8b_shape", "model.num_layers=2", "dry_run=true", "layers=all", "ratio=0.1"],
                       tmp_path / "b")
    assert "32 layers" in full.model and "2 layers" in short.model
    assert short.peak()[0].host_bytes < full.peak()[0].host_bytes


@pytest.mark.parametrize("overrides", [
    ["task=prune", "pruner=obs"], ["task=prune", "pruner=taylor"], ["task=prune", "pruner=wanda"],
    ["task=prune", "pruner=flap"], ["task=prune", "pruner=shortgpt", "pruner.num_layers=1"],
    ["task=prune", "pruner=slicegpt"], ["task=prune", "pruner=magnitude"], ["task=prune", "recovery=lora"],
    ["task=evaluate"], ["task=finetune", "recovery=lora"], ["task=export"],
    ["task=replace", "replacement.base=tiny", "replacement.donor=tiny", "replacement.layers=[1]"],
    ["task=search", "replacement.base=tiny", "replacement.donor=tiny", "search.k=[1]"],
], ids=lambda o: " ".join(o))
def test_dry_run_of_every_task_that_loads_a_model(tmp_path, no_loading, overrides):
    result, m = run_task([*TINY, *overrides, "dry_run=true"], tmp_path)
    assert result is None and m["status"] == "dry_run", m.get("error")
    plan = m["plan"]
    assert plan["peak"]["host_bytes"] > P.PROCESS_BASELINE_BYTES and not plan["unknown"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no model, no analysis, no W&B


def test_a_task_without_a_model_has_nothing_to_plan(tmp_path, capsys):
    result, m = run_task(["task=table", "logger=none", f"runs=[{tmp_path}]", "dry_run=true"], tmp_path / "t")
    assert m["status"] == "dry_run" and "nothing to plan" in capsys.readouterr().out


def test_the_results_table_lists_a_dry_run_apart(tmp_path):
    from analysis.results_table import collect

    run_task([*TINY, "dry_run=true"], tmp_path / "plan")
    df = collect([str(tmp_path)])
    row = df.iloc[0]
    assert row["status"] == "dry_run" and "a plan only" in row["note"]


# --------------------------------------------------------------------------- the check before loading


def test_a_run_that_cannot_fit_stops_before_loading_naming_the_knobs(tmp_path, no_loading):
    with pytest.raises(SystemExit):
        run_task([*TINY, "plan.host_memory=100MB"], tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    msg = m["error"]["message"]
    assert m["status"] == "failed" and m["error"]["type"] == "PlanError" and "\n" not in msg
    assert "cannot fit: predicted peak host memory" in msg and "> 100.0 MiB available" in msg
    for knob in ("pruner.offload", "pruner.tokens", "pruner.batch_size", "plan.force=true"):
        assert knob in msg, msg
    assert m["plan"]["available"]["fits"] is False and not (tmp_path / "model").exists()


def test_the_refusal_names_the_setting_that_fits(tmp_path):
    """Between the peak with default tokens and with half of them: the knob named is the halving, with its peak."""
    from recipes._plan import enforce, prepare

    args = ["model=llama3_8b_shape", "model.num_layers=2", "layers=all", "ratio=0.1", "logger=none",
            "pruner.states=device"]
    cfg, plan = planned(args, tmp_path)
    half = dict(plan.variants)[f"pruner.tokens={plan.peak()[0].tokens // 2}"]
    limit = (plan.peak()[0].host_bytes + half.peak()[0].host_bytes) // 2
    cfg = compose([*args, f"plan.host_memory={limit}"], tmp_path)

    class Ctx:
        def log(self, section, values):
            self.plan = values

    import run

    ctx = Ctx()
    with pytest.raises(P.PlanError, match=rf"to fit, try .*pruner.tokens={plan.peak()[0].tokens // 2} \(device -, host"):
        enforce(cfg, prepare(cfg, run.check(cfg)), ctx)
    assert ctx.plan["available"]["host_bytes"] == limit
    enforce(compose([*args, f"plan.host_memory={limit}", "plan.force=true"], tmp_path),
            prepare(cfg, run.check(cfg)), ctx)  # forced: no error


def test_one_clear_line_on_the_command_line(tmp_path):
    proc = cli([*TINY, "plan.host_memory=100MB"], tmp_path / "run")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if "[ERROR]" in l]
    assert len(errors) == 1 and "this run cannot fit" in errors[0] and "plan.force=true" in errors[0]


# --------------------------------------------------------------------------- devices this machine lacks


@pytest.mark.parametrize("count,overrides,match", [
    (0, ["model.device=cuda"], "model.device=cuda: this machine has no CUDA device"),
    (1, ["model.device=cuda:1"], "model.device=cuda:1: only 1 CUDA device(s) here"),
    (1, ["model.device_map={model.layers.0:'cuda:3'}"], "model.device_map[model.layers.0]=cuda:3: only 1 CUDA"),
    (0, ["model.device_map={model.layers.0:'cuda:0'}"], "model.device_map[model.layers.0]=cuda:0: this machine has "
                                                        "no CUDA"),
    (0, ["pruner=wanda", "pruner.offload=true", "pruner.device=cuda"], "pruner.device=cuda: this machine has no CUDA"),
    (0, ["pruner=wanda", "pruner.offload=true"], "pruner.offload=true needs pruner.device"),
])
def test_devices_this_machine_lacks_fail_in_one_line_before_loading(tmp_path, no_loading, gpus, count, overrides,
                                                                    match):
    gpus(count)
    with pytest.raises(SystemExit):
        run_task([*TINY, *overrides], tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "failed" and match in m["error"]["message"], m["error"]["message"]
    assert m["error"]["message"].count("\n") <= 1  # (a config error: its heading line and the problem)


def test_a_dry_run_may_plan_for_a_gpu_that_is_not_here(tmp_path, no_loading, gpus):
    gpus(0)
    _, m = run_task([*TINY, "model.device=cuda", "plan.device_memory=24GB", "dry_run=true"], tmp_path)
    assert m["status"] == "dry_run" and m["plan"]["devices"] == ["cuda:0"]
    assert m["plan"]["available"]["device_bytes"] == 24 * P.GIB and m["plan"]["available"]["fits"] is True


@pytest.mark.parametrize("count,device", [(0, "cpu"), (1, "cuda")])
def test_device_auto_is_recorded_as_the_device_used(tmp_path, no_loading, gpus, count, device):
    gpus(count)
    cfg = compose(["model=smollm2"], tmp_path / "c")
    assert cfg.model.device == "auto"  # the embedded model's default
    _, m = run_task([*TINY, "model.device=auto", "dry_run=true"], tmp_path / "run")
    assert m["config"]["model"]["device"] == device and m["plan"]["device"] == device
