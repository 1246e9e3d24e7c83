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


def _huge_depth(ckpt: Path, tmp: Path) -> Path:
    """num_hidden_layers = 10^9: refused from config.json before anything is built (it once held 11.8 GB)."""
    d = _copy(ckpt, tmp / "huge")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
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
    (_huge_depth, "analyze", "num_hidden_layers=1,000,000,000 is absurd (more than 4,096)"),
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
    (["pruner=joint", "+pruner.width.offload=true", "+pruner.width.device=cuda"],
     "pruner.width.device=cuda: this machine has no CUDA device"),  # a stage's device, before any weight is read
    (["model.device=gpu0"], "model.device='gpu0' is not a device"),
    (["task=train"], "task='train' is not one of"),
    (["optimized_metric.direction=maximize"], "ppl is to minimize, not maximize"),
    (["eval=quick", "eval.tasks=[no_such_task_xyz]"], "unknown lm-eval task(s): no_such_task_xyz"),
])
def test_bad_settings(tmp_path, args, fragment):
    if any(a.endswith("device=cuda") for a in args):
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


# --- run, sweep and job dirs: a path is judged after `..`, `~` and symlinks are followed ------------------------
# Each case: (the overrides, given the earlier run E and the earlier sweep W; the one-line message). After each,
# every file of E and W is byte-identical and nothing was created on the way (`<new>` of `<new>/../E` included).

LONG = "x" * 300  # longer than any file system's 255-byte name


def tree_digest(root: Path) -> dict[str, str]:
    """Every file, dir and link under ``root`` -> its content hash (a dir: "dir", a link: its target)."""
    import hashlib

    out: dict[str, str] = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(d) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> dict:
    """An earlier run E (with its model) and an earlier sweep W (two jobs), in one outputs folder."""
    root = tmp_path_factory.mktemp("earlier")
    run_dir, sweep = root / "E", root / "W"
    run_task([*TINY, "ratio=0.5"], run_dir)
    (run_dir / ".hydra").mkdir()  # as run.py's Hydra leaves it
    (run_dir / ".hydra" / "overrides.yaml").write_text("- ratio=0.5\n")
    proc = cli(["-m", *TINY, "save_model=false", "data.num_samples=2", "data.seq_len=16", "ratio=0.2,0.3",
                f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"root": root, "E": run_dir, "W": sweep, "digest": {d: tree_digest(root / d) for d in ("E", "W")}}


RUN_DIR_CASES = [  # run.py <TINY> hydra.run.dir=...
    ("{new}/../E", "{E} already holds a run"),
    ("{new}/../E/model", "is inside the earlier run {E}"),
    ("{new}/../W/0", "{W}/0 already holds a run"),
    ("{new}/../W", "is the earlier sweep {W}"),
    ("{new}/../W/extra", "is inside the earlier sweep {W}"),
    ("{link_E}", "{E} already holds a run"),
    ("{root}/" + LONG, "hydra.run.dir: File name too long"),
]
SWEEP_DIR_CASES = [  # run.py -m <TINY> ratio=0.1,0.2 hydra.sweep.dir=... (and the job's subdir)
    (["hydra.sweep.dir={new}/../W"], "{W} already holds a sweep"),
    (["hydra.sweep.dir={new}/../E"], "is the earlier run {E}"),
    (["hydra.sweep.dir={new}/../W/0"], "is the earlier run {W}/0"),
    (["hydra.sweep.dir={new}/../W/extra"], "is inside the earlier sweep {W}"),
    (["hydra.sweep.dir={new}", "hydra.sweep.subdir=../E"], "puts job 0 in {E}, outside the sweep dir"),
    (["hydra.sweep.dir={root}/" + LONG], "hydra.sweep.dir: File name too long"),
]


def _dir_case(earlier: dict, tmp_path: Path, text: str) -> str:
    link = tmp_path / "link_to_E"
    if not link.is_symlink():
        link.symlink_to(earlier["E"])
    return text.format(new=_new(earlier, tmp_path), link_E=link, **{k: earlier[k] for k in ("root", "E", "W")})


def _new(earlier: dict, tmp_path: Path) -> Path:
    return earlier["root"] / f"new-{tmp_path.name}"  # beside E and W: <new>/../E is E


def _nothing_touched(earlier: dict, tmp_path: Path) -> None:
    assert {d: tree_digest(earlier["root"] / d) for d in ("E", "W")} == earlier["digest"]
    assert sorted(p.name for p in earlier["root"].iterdir()) == ["E", "W"]  # no <new>, no long name


@pytest.mark.parametrize("run_dir,fragment", RUN_DIR_CASES)
def test_run_dir_never_reaches_an_earlier_run(earlier, tmp_path, run_dir, fragment):
    proc = cli([*TINY, f"hydra.run.dir={_dir_case(earlier, tmp_path, run_dir)}"])
    assert_one_clear_line(proc, _dir_case(earlier, tmp_path, fragment))
    assert "UserWarning" not in proc.stderr  # never Hydra's callback warning
    _nothing_touched(earlier, tmp_path)


@pytest.mark.parametrize("args,fragment", SWEEP_DIR_CASES)
def test_sweep_dir_never_reaches_an_earlier_run(earlier, tmp_path, args, fragment):
    proc = cli(["-m", *TINY, "ratio=0.1,0.2", *(_dir_case(earlier, tmp_path, a) for a in args)])
    assert_one_clear_line(proc, _dir_case(earlier, tmp_path, fragment))
    assert "UserWarning" not in proc.stderr
    _nothing_touched(earlier, tmp_path)


def test_a_dotdot_path_to_a_new_dir_is_that_dir(tmp_path):
    """``<new>/../fresh`` is the fresh dir ``<parent>/fresh``: the run goes there and is recorded there."""
    proc = cli([*TINY, "save_model=false", f"hydra.run.dir={tmp_path / 'new' / '..' / 'fresh'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "fresh" / "metrics.json").read_text())["status"] == "completed"


# --- task=table and task=report over hostile folders: (folder maker, what the output must show) ---------------

def _symlink_loops(run: Path, tmp: Path) -> Path:
    """One run, and three links that lead back into the folder (``a -> .``, ``b -> .``, ``run/up -> ..``):
    a walk that follows links without remembering where it has been never ends (2^40 paths)."""
    folder = tmp / "loops"
    folder.mkdir()
    shutil.copytree(run, folder / "run", symlinks=True)
    (folder / "a").symlink_to(".")
    (folder / "b").symlink_to(".")
    (folder / "run" / "up").symlink_to("..")
    return folder


def _linked_run(run: Path, tmp: Path) -> Path:
    """A run reached through a symlinked dir only (still found: links are followed, each real dir once)."""
    folder = tmp / "linked"
    folder.mkdir()
    (folder / "elsewhere").symlink_to(run, target_is_directory=True)
    return folder


FOLDER_CASES = [  # (maker, task): the one earlier run appears exactly once, within the time limit
    (_symlink_loops, "table"),
    (_symlink_loops, "report"),
    (_linked_run, "table"),
]


@pytest.mark.parametrize("make,task", FOLDER_CASES)
def test_table_and_report_over_hostile_folders(earlier, tmp_path, make, task):
    folder = make(earlier["E"], tmp_path)
    out = tmp_path / "out"
    proc = cli([f"task={task}", "logger=none", f"runs=[{folder}]"], out, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    if task == "table":
        assert m["table"]["runs"] == 1
    else:
        assert '<b id="n-runs">1</b>' in (out / "report.html").read_text()


# --- writes outside the run dir: only with next_to_inputs=true, never over a file or into a live run -----------

def test_report_writes_into_its_own_run_dir(earlier, tmp_path):
    out = tmp_path / "out"
    proc = cli(["task=report", "logger=none", f"runs=[{earlier['W']}]"], out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "report.html").is_file() and f"report: {out / 'report.html'}" in proc.stderr
    assert json.loads((out / "metrics.json").read_text())["report"]["copy"] is None
    _nothing_touched(earlier, tmp_path)  # the sweep's own report.html is left as it was


def test_report_next_to_inputs(earlier, tmp_path):
    # over an earlier report.html: refused before anything is written
    proc = cli(["task=report", "logger=none", f"runs=[{earlier['W']}]", "next_to_inputs=true"], tmp_path / "r1")
    assert_one_clear_line(proc, f"{earlier['W'] / 'report.html'} exists (an earlier report) and is never replaced")
    _nothing_touched(earlier, tmp_path)
    # into a live run's dir (this test's own process is the live run): refused
    live = tmp_path / "live"
    shutil.copytree(earlier["E"], live)
    m = json.loads((live / "metrics.json").read_text())
    (live / "metrics.json").write_text(json.dumps({**m, "status": "running", "pid": os.getpid()}))
    proc = cli(["task=report", "logger=none", f"runs=[{live}]", "next_to_inputs=true"], tmp_path / "r2")
    assert_one_clear_line(proc, f"{live} is a run still in progress")
    assert not (live / "report.html").exists()
    # a folder with no report yet: the copy is written, recorded and printed
    folder = tmp_path / "folder"
    shutil.copytree(earlier["E"], folder / "run")
    proc = cli(["task=report", "logger=none", f"runs=[{folder}]", "next_to_inputs=true"], tmp_path / "r3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    copy = folder / "report.html"
    assert copy.read_bytes() == (tmp_path / "r3" / "report.html").read_bytes()
    assert json.loads((tmp_path / "r3" / "metrics.json").read_text())["report"]["copy"] == str(copy)
    assert f"copied next to the inputs (next_to_inputs=true): {copy}" in proc.stderr


def test_batch_analyze_writes_into_its_own_run_dir(earlier, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(earlier["E"] / "model", models / "m1")
    before = tree_digest(models)
    proc = cli(["task=batch_analyze", f"models_dir={models}", "base=tiny", "logger=none"], tmp_path / "b1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tree_digest(models) == before  # the models' folder is only read
    assert (tmp_path / "b1" / "models_analysis" / "analysis" / "m1" / "model_structure.json").is_file()  # output_name
    # next_to_inputs=true: next to the model, recorded and printed
    proc = cli(["task=batch_analyze", f"models_dir={models}", "base=tiny", "logger=none", "next_to_inputs=true"],
               tmp_path / "b2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = models / "m1" / "analysis"
    assert (out / "model_structure.json").is_file() and not (tmp_path / "b2" / "models_analysis" / "analysis").exists()
    rec = json.loads((tmp_path / "b2" / "metrics.json").read_text())["batch_analyze"]
    assert rec["next_to_inputs"] is True and rec["written_next_to_inputs"] == [str(out)]
    assert f"analysis written next to the model (next_to_inputs=true): {out}" in proc.stderr
