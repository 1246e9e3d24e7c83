"""Issue 26 item 9, the seeds' smaller habits: a named results folder (the seeds' ``--output_dir``), a runnable
``command.sh`` in every run dir (the old ``train.sh``), the seed's SliceGPT record fields on task=convert, and the
migration page's loading snippet. Each is built from artefacts made the way the seeds describe."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CACHE_DIR, ROOT, run_task

FAST = ["logger=none", "eval=none"]


def cli(args: list[str], env: dict | None = None, script: Path | None = None) -> subprocess.CompletedProcess:
    """``python run.py <args>`` (or ``<script> <args>``) from another working directory, as a user would."""
    cmd = [str(script), *args] if script else [sys.executable, str(ROOT / "run.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, cwd="/",
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **(env or {})})


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


# --------------------------------------------------------------------------- (a) output_name


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """(base, donor): two tiny Llamas saved as HF dirs, the base under a real model's folder name."""
    from core.models.load import build_tiny

    root = tmp_path_factory.mktemp("pair")
    for name, seed in (("Llama-3-8B-Instruct", 1), ("donor", 0)):
        model, tok = build_tiny(num_layers=4, seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "Llama-3-8B-Instruct", root / "donor"


def test_output_name_names_the_results_folder(pair, tmp_path):
    """replace: ``<base>_replaced_<layers>`` by default (the seed's llamba_replaced_11_13_17_21), or output_name;
    batch_analyze: ``<models_dir>_analysis`` (the seed's baselines_analysis); recorded in metrics.json; a name that
    is a path is refused in one line before any weight is read, and never reaches another run."""
    import run
    from core.run.errors import ConfigError
    from recipes._callbacks import saved_model

    base, donor = pair
    common = ["task=replace", f"replacement.base={base}", f"replacement.donor={donor}", "replacement.layers=[3,1]",
              *FAST]
    _, m = run_task(common, tmp_path / "r1")
    out = tmp_path / "r1" / "llama_replaced_1_3"
    assert m["status"] == "completed", m.get("error")
    assert m["output"] == {"name": "llama_replaced_1_3", "path": str(out), "derived": True, "written": True}
    assert m["checkpoint"]["path"] == str(out) and not (tmp_path / "r1" / "model").exists()
    assert json.loads((out / "checkpoint_info.json").read_text())["replaced_layers"] == [1, 3]
    assert (out / "README.txt").is_file() and (out / "model.safetensors").is_file()
    assert saved_model(tmp_path / "r1") == out  # what a replace sweep's summary analyses
    _, m = run_task([*common, "output_name=best_2layer"], tmp_path / "r2")
    assert m["output"]["name"] == "best_2layer" and (tmp_path / "r2" / "best_2layer" / "config.json").is_file()

    models = tmp_path / "baselines"
    (models / "Taylor").mkdir(parents=True)
    for f in (tmp_path / "r1" / "llama_replaced_1_3").iterdir():
        (models / "Taylor" / f.name).write_bytes(f.read_bytes())
    _, m = run_task(["task=batch_analyze", f"models_dir={models}", "base=tiny", "count_nonzero=false", *FAST],
                    tmp_path / "b1")
    out = tmp_path / "b1" / "baselines_analysis"
    assert m["status"] == "completed" and m["output"]["path"] == str(out)
    assert {"batch_analysis_results.json", "models_summary.json", "analysis"} <= {p.name for p in out.iterdir()}
    assert (out / "analysis" / "Taylor" / "model_structure.json").is_file()
    assert not (tmp_path / "b1" / "models_summary.json").exists()
    _, m = run_task(["task=batch_analyze", f"models_dir={models}", "base=tiny", "count_nonzero=false",
                     "output_name=my_custom_analysis", *FAST], tmp_path / "b2")
    assert (tmp_path / "b2" / "my_custom_analysis" / "models_summary.json").is_file()

    for bad, why in (("../r1", "contains a path separator"), ("/tmp/x", "contains a path separator"),
                     ("..", "names the run dir or its parent"), (".hidden", "is hidden"),
                     ("metrics.json", "one of the run dir's own entries"), (" x", "starts or ends with a space"),
                     ("x" * 256, "longer than 255 bytes")):
        for task in (common, ["task=batch_analyze", f"models_dir={models}"],
                     ["task=convert", f"model={base}", "base=tiny"]):
            with pytest.raises(ConfigError, match=re.escape(why)):
                run.compose_and_validate([*task, f"output_name='{bad}'"])
    for task in (["task=prune"], ["task=evaluate", f"model={base}"], ["task=analyze", f"model={base}"]):  # no folder
        with pytest.raises(ConfigError, match="writes no named results folder"):
            run.compose_and_validate([*task, "output_name=mine"])
    # through the CLI: one line, exit 1, no checkpoint, and the earlier run it points at is byte-identical
    before = digest(tmp_path / "r1")
    proc = cli([*common, "output_name=../r1", f"hydra.run.dir={tmp_path / 'r3'}", f"paths.cache_dir={CACHE_DIR}"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "output_name='../r1' contains a path separator" in proc.stderr
    assert digest(tmp_path / "r1") == before
    assert sorted(p.name for p in (tmp_path / "r3").iterdir()) == [".hydra", "command.sh", "metrics.json", "run.log"]
    assert "load_s" not in json.loads((tmp_path / "r3" / "metrics.json").read_text()).get("timings", {})


# --------------------------------------------------------------------------- (b) command.sh


def _exec_args(script: Path) -> list[str]:
    """The run.py arguments of command.sh's exec line, as bash splits them."""
    line = next(l for l in script.read_text().splitlines() if l.startswith("exec "))
    words = shlex.split(line)
    return words[words.index("run.py") + 1:-1]  # up to "$@"


def test_command_sh_reproduces_the_run_and_each_sweep_job(tmp_path):
    """A run dir holds an executable command.sh that cds to the repository and runs the same overrides (shell-quoted,
    a path with a space and a quote included); run again, it composes the same config into a new run dir. A sweep's
    job gets its own values, not the sweep's lists."""
    import run
    from omegaconf import OmegaConf

    from recipes._launch import compose_jobs

    odd = tmp_path / "it's a dir"
    args = ["model=tiny", "pruner=taylor", "layers=all", "ratio=0.5", f'data.path="{odd}/calib.txt"', "dry_run=true",
            *FAST, f"paths.cache_dir={CACHE_DIR}"]
    proc = cli([*args, f"hydra.run.dir={tmp_path / 'a'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    script = tmp_path / "a" / "command.sh"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and f"\ncd {shlex.quote(str(ROOT))}\n" in text
    assert script.stat().st_mode & stat.S_IXUSR and "hydra.run.dir" not in text  # a rerun writes a new run dir
    written = OmegaConf.load(tmp_path / "a" / ".hydra" / "overrides.yaml")
    assert _exec_args(script) == list(written) == args
    # run again (extra overrides come last): the same config, in its own new dir; the first run untouched
    before = digest(tmp_path / "a")
    again = cli([f"hydra.run.dir={tmp_path / 'b'}"], script=script)
    assert again.returncode == 0, again.stderr[-2000:]
    assert digest(tmp_path / "a") == before
    for f in ("config.yaml", "overrides.yaml"):
        assert (tmp_path / "b" / ".hydra" / f).read_text() == (tmp_path / "a" / ".hydra" / f).read_text()
    first, second = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert first["status"] == second["status"] == "dry_run"
    assert {**first["config"], "paths": None} == {**second["config"], "paths": None}
    (cfg,) = compose_jobs(_exec_args(script))  # the overrides it holds compose the run's config, and validate
    assert OmegaConf.to_yaml(cfg) == (tmp_path / "a" / ".hydra" / "config.yaml").read_text()
    run.compose_and_validate(_exec_args(script))

    sweep = tmp_path / "sweep"
    proc = cli(["-m", "model=tiny", "pruner=taylor", "layers=all", "ratio=0.25,0.5", "dry_run=true", *FAST,
                f"paths.cache_dir={CACHE_DIR}", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job, ratio in (("0", 0.25), ("1", 0.5)):
        job_args = _exec_args(sweep / job / "command.sh")
        assert f"ratio={ratio}" in job_args and "-m" not in job_args and "ratio=0.25,0.5" not in job_args
        (cfg,) = compose_jobs(job_args)
        assert cfg.ratio == ratio and OmegaConf.to_yaml(cfg) == (sweep / job / ".hydra" / "config.yaml").read_text()


# --------------------------------------------------------------------------- (c) SliceGPT's record fields


def _slicegpt_folder(root: Path, sparsity: float, bundle: dict | None = None) -> tuple[Path, torch.nn.Module]:
    """run_slicegpt.py --save-dir with a local --model-path (``<model>_<sparsity>.pt`` + ``.json`` + config.json),
    and, given ``bundle``, convert_slicegpt_model.py's dill ``pruned_model.bin`` beside them (the loaded model with
    SliceGPT's by-value class, and the seed's metadata)."""
    import dill

    from core.models.load import build_tiny
    from core.models.slicegpt import save_slicegpt
    from pruning.slicegpt import SliceGPT

    model, tok = build_tiny(num_layers=4, seed=0)
    model.config.rms_norm_eps = 1e-5
    SliceGPT(sparsity=sparsity, progress=False)(model, torch.randint(0, 256, (4, 24),
                                                                      generator=torch.Generator().manual_seed(0)))
    save_slicegpt(model, root, "Llama-tiny", sparsity)
    if bundle is not None:
        uninit = type("UninitializedLlamaForCausalLM", (type(model),), {
            "__module__": "slicegpt.hf_utils",
            "__qualname__": "load_sliced_model.<locals>.UninitializedLlamaForCausalLM"})
        pickled = copy.deepcopy(model)
        pickled.__class__ = uninit
        torch.save({"model": pickled, "tokenizer": tok, "method": "SliceGPT", **bundle}, root / "pruned_model.bin",
                   pickle_module=dill)
    return root, model


def test_convert_records_the_seeds_slicegpt_fields(tmp_path):
    """pruning_ratio (asked), actual_ratio (1 - the sliced width / hidden) and round_interval, under the seed's names,
    in checkpoint_info.json and metrics.json: stated by the seed's bundle when one is beside the files, inferred from
    SliceGPT's rounding when only one power of two fits, null with the reason otherwise."""
    # 0.3 of hidden 64: int(0.7 * 64) = 44, rounded down to a multiple of 8 = 40 (4 and 2 would give 44)
    folder, model = _slicegpt_folder(tmp_path / "SliceGPT_3000", 0.3)
    assert model.config.slicing["embedding_dimension"] == 40
    _, m = run_task(["task=convert", f"model={folder}", *FAST], tmp_path / "run1")
    assert m["status"] == "completed", m.get("error")
    out = tmp_path / "run1" / "Llama-tiny_0.3"  # output_name's default: SliceGPT's file name
    assert m["output"]["path"] == str(out) == m["checkpoint"]["path"]
    info = json.loads((out / "checkpoint_info.json").read_text())
    assert (info["pruning_ratio"], info["actual_ratio"], info["round_interval"]) == (0.3, 1 - 40 / 64, 8)
    src = info["seed_fields_source"]
    assert "Llama-tiny_0.3.pt" in src["pruning_ratio"] and src["actual_ratio"].startswith("1 - 40 / 64")
    assert src["round_interval"].startswith("inferred: the one power of two")
    assert "5, 10, 20, 40" in src["round_interval"]  # the others that fit, named
    assert {k: m["conversion"][k] for k in ("pruning_ratio", "actual_ratio", "round_interval")} == {
        "pruning_ratio": 0.3, "actual_ratio": 0.375, "round_interval": 8}

    # 0.25: int(0.75 * 64) = 48 needs no rounding, so the widths cannot tell the interval ...
    folder, _ = _slicegpt_folder(tmp_path / "SliceGPT_2500", 0.25)
    _, m = run_task(["task=convert", f"model={folder}", *FAST], tmp_path / "run2")
    c = m["conversion"]
    assert (c["pruning_ratio"], c["actual_ratio"], c["round_interval"]) == (0.25, 0.25, None)
    assert c["seed_fields_source"]["round_interval"].startswith("null: several intervals") and \
        "no rounding was needed" in c["seed_fields_source"]["round_interval"]
    # ... unless the seed's dill bundle beside it says so (read without running any of its code)
    folder, _ = _slicegpt_folder(tmp_path / "SliceGPT_2500b", 0.25, bundle={
        "pruning_ratio": 0.25, "actual_ratio": 0.25,
        "config": {"base_model": "/newdata/LLMs/Llama-3-8B-Instruct", "sparsity": 0.25, "round_interval": 8}})
    _, m = run_task(["task=convert", f"model={folder}", *FAST], tmp_path / "run3")
    c = m["conversion"]
    assert (c["pruning_ratio"], c["actual_ratio"], c["round_interval"]) == (0.25, 0.25, 8)
    assert c["seed_fields_source"]["round_interval"] == "stated by pruned_model.bin (config.round_interval)"
    # a file named without its sparsity: nothing to compare the width with
    folder, _ = _slicegpt_folder(tmp_path / "renamed", 0.3)
    for suffix in (".pt", ".json"):
        (folder / f"Llama-tiny_0.3{suffix}").rename(folder / f"sliced{suffix}")
    _, m = run_task(["task=convert", f"model={folder}", *FAST], tmp_path / "run4")
    c = m["conversion"]
    assert (c["pruning_ratio"], c["actual_ratio"], c["round_interval"]) == (None, 0.375, None)
    assert "no _<sparsity> suffix" in c["seed_fields_source"]["pruning_ratio"]
    assert m["output"]["name"] == "sliced"


# --------------------------------------------------------------------------- (d) the migration page


MIGRATION = ROOT / "docs" / "migration.md"


def test_migration_page_maps_every_seed_script_and_its_snippet_loads(tmp_path):
    """Every old script and file the seeds name has its row on docs/migration.md, and the page's replacement for
    ``torch.load('pytorch_model.bin')['model']`` loads a pruned run's checkpoint (per-layer widths: remote code) in
    plain transformers, without prunelab, with the run's logits."""
    text = MIGRATION.read_text(encoding="utf-8")
    for old in ("llama3.py", "post_training.py", "check_model_size.py", "analyze_pruning.py", "model_analysis.py",
                "batch_model_analysis.py", "test_model_info.py", "analyze_slicegpt.sh", "convert_slicegpt_model.py",
                "run_evaluation.py", "generate_results_table.py", "create_replaced_model_checkpoint.py",
                "create_best_checkpoints.sh", "test_checkpoint.py", "extract_layers.py", "description.txt",
                "train.sh", "training.log", "latest_model.bin", "pytorch_model.bin", "model_state_dict.pt",
                "checkpoint_info.json", "README.txt", "models_summary.json", "batch_analysis_results.json",
                "model_structure.json", "model_comparison.json", "structure_summary.txt", "detailed_analysis.csv",
                "--output_dir", "pruning_ratio", "round_interval", "mmlu_score", "command.sh", "output_name"):
        assert old in text, f"docs/migration.md does not mention {old}"
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    snippet = next(b for b in blocks if "from_pretrained" in b and "run_dir" in b)
    _, m = run_task(["model=tiny", "pruner=taylor", "layers=all", "ratio=0.5", *FAST], tmp_path / "run")
    ckpt = Path(m["checkpoint"]["path"])
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "prunelab_llama"
    # the snippet with this run's dir, in a process without prunelab on its path, as the user's own code would run it
    code, n = re.subn(r'run_dir = Path\("[^"]*"\)', f"run_dir = Path({str(tmp_path / 'run')!r})", snippet)
    assert n == 1, snippet
    code += (
        "\nimport torch\nids = torch.tensor([[1, 2, 3, 4]])\n"
        "with torch.no_grad():\n    print(model(ids).logits[0, -1, :5].tolist())\n")
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                  "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    from core.models.load import load_model
    from core.models.ref import ModelRef

    ours, _ = load_model(ModelRef.at(ckpt), cache_dir=tmp_path)
    with torch.no_grad():
        want = ours(torch.tensor([[1, 2, 3, 4]])).logits[0, -1, :5]
    torch.testing.assert_close(torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1])), want,
                               rtol=1e-5, atol=1e-5)
