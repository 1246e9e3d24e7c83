"""The bad-input suite, through the real CLI: each case is (the input, the one-line message, the exit code,
what must be on disk afterwards). Every failure is one clear line on stderr, no traceback, and no checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CACHE_DIR, ROOT, run_task

TINY = ["model=tiny", "pruner=taylor", "logger=none", "eval=none", "layers=all"]


def cli(args: list[str], run_dir: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    extra = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"paths.cache_dir={CACHE_DIR}", *extra],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_clear_line(proc: subprocess.CompletedProcess, fragment: str, code: int = 1) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if "[ERROR]" in l or l.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]  # printed once (a multi-problem config error continues below it)
    assert fragment in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A saved tiny prunelab checkpoint, copied per test before it is damaged."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    run_task([*TINY, "ratio=0.5"], run_dir)
    return run_dir / "model"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncated(ckpt: Path, tmp: Path) -> Path:
    d = _copy(ckpt, tmp / "truncated")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d


def _missing_tensor(ckpt: Path, tmp: Path) -> Path:
    from safetensors.torch import load_file, save_file

    d = _copy(ckpt, tmp / "missing tensor")
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _no_depth(ckpt: Path, tmp: Path) -> Path:
    d = _copy(ckpt, tmp / "gpt2like")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("num_hidden_layers")
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _pickled_bin(ckpt: Path, tmp: Path) -> Path:
    import torch

    from analysis_helpers import Tok

    d = tmp / "hf_with_pickle"
    d.mkdir()
    shutil.copy(ckpt / "config.json", d / "config.json")
    torch.save({"model": torch.nn.Linear(2, 2), "tokenizer": Tok()}, d / "pytorch_model.bin")
    return d


@pytest.mark.parametrize("make,task,fragment", [
    (_truncated, "prune", "could not load model"),
    (_truncated, "evaluate", "could not load model"),
    (_missing_tensor, "prune", "the weights do not match config.json: 1 missing (model.layers.1.mlp.up_proj.weight)"),
    (_missing_tensor, "evaluate", "1 missing (model.layers.1.mlp.up_proj.weight)"),
    (_no_depth, "prune", "no num_hidden_layers (model_type 'gpt2'): prunelab reads Llama-style decoders"),
    (_pickled_bin, "prune", "Re-run with allow_pickle=true only if you trust the file"),
])
def test_broken_models(checkpoint, tmp_path, make, task, fragment):
    model_dir = make(checkpoint, tmp_path)
    run_dir = tmp_path / "run"
    proc = cli([f"task={task}", f"model={model_dir}", "logger=none", "eval=none", "layers=all"], run_dir)
    assert_one_clear_line(proc, fragment)
    assert "weights_only" not in proc.stderr
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "failed" and fragment in m["error"]["message"]
    assert not (run_dir / "model").exists() and not list(run_dir.glob(".model.partial-*"))


def _latin1(tmp: Path) -> Path:
    p = tmp / "latin1.txt"
    p.write_bytes(("Caf\xe9 au lait. " * 400 + "\n\n") .encode("latin-1") * 10)
    return p


@pytest.mark.parametrize("args,fragment", [
    (["ratio=1.5"], "ratio=1.5 must be in [0, 1)"),
    (["runtime.threads=0"], "runtime.threads=0 must be >= 1"),
    (["runtime.threads=-1"], "runtime.threads=-1 must be >= 1"),
    (["pruner.batch_size=-2"], "pruner.batch_size=-2 must be >= 0"),
    (["+pruner.taylr=param_first"], "pruner.taylr: not an option of pruning.llm_pruner.LLMPruner"),
    (["data.seq_len=4096"], "data.seq_len=4096 is longer than the model's context of 2048 tokens"),
    (["eval=quick", "eval.ppl.seq_len=3000"], "eval.ppl.seq_len=3000 is longer than the model's context"),
    (["model.device=cuda"], "model.device=cuda: this machine has no CUDA device"),
    (["model.device=gpu0"], "model.device='gpu0' is not a device"),
    (["task=train"], "task='train' is not one of"),
    (["optimized_metric.direction=maximize"], "ppl is to minimize, not maximize"),
    (["eval=quick", "eval.tasks=[no_such_task_xyz]"], "unknown lm-eval task(s): no_such_task_xyz"),
])
def test_bad_settings(tmp_path, args, fragment):
    if args == ["model.device=cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    run_dir = tmp_path / "run"
    assert_one_clear_line(cli([*TINY, *args], run_dir), fragment)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"
    assert not (run_dir / "model").exists()


def test_non_utf8_calibration_text(tmp_path):
    proc = cli([*TINY, "data=text_file", f"data.path={_latin1(tmp_path)}"], tmp_path / "run")
    assert_one_clear_line(proc, "is not UTF-8 text")


def test_missing_models_dir(tmp_path):
    proc = cli(["task=batch_analyze", f"models_dir={tmp_path / 'nope'}", "base=tiny", "logger=none"], tmp_path / "run")
    assert_one_clear_line(proc, "no such folder")


@pytest.mark.parametrize("kind", ["file", "impossible"])
def test_unusable_run_dir(tmp_path, kind):
    if kind == "file":
        target = tmp_path / "a_file"
        target.write_text("keep me")
        fragment = "is a file, not a directory"
    else:
        blocker = tmp_path / "blocker"
        blocker.write_text("x")
        target = blocker / "sub"  # a dir below a file cannot exist
        fragment = "cannot be created"
    proc = cli(TINY, target)
    assert_one_clear_line(proc, fragment)
    if kind == "file":
        assert target.read_text() == "keep me"


def test_unwritable_run_dir(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    assert_one_clear_line(cli(TINY, d), "is not writable")


def test_model_path_with_spaces_and_non_ascii(checkpoint, tmp_path):
    odd = _copy(checkpoint, tmp_path / "my models" / "Modèle élagué, v2 (test)")
    proc = cli(["task=evaluate", f"model={odd}", "logger=none", "eval=none"], tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "completed" and m["model"]["path"] == str(odd)


def test_unexpected_error_traceback_printed_once(tmp_path):
    """A bug (not bad input) is printed with its traceback once, recorded as failed, exit 1."""
    code = (f"import sys, runpy; sys.path.insert(0, {str(ROOT)!r}); import recipes.prune as p\n"
            "def boom(cfg, ctx): raise RuntimeError('simulated bug')\n"
            "p.run = boom\n"
            f"sys.argv = ['run.py', 'model=tiny', 'pruner=taylor', 'layers=all', 'logger=none', "
            f"'hydra.run.dir={tmp_path / 'run'}']\n"
            f"runpy.run_path({str(ROOT / 'run.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.count("Traceback") == 1 and "simulated bug" in proc.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "failed" and m["error"]["type"] == "RuntimeError"
