"""task=replace and task=search end to end on tiny models saved on disk (a pruned base, its original as donor)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CACHE_DIR, ROOT, run_task

FAST = ["logger=none", "eval=none", "data.seq_len=16"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """(base checkpoint, donor dir): tiny Llama pruned by half, and the original saved as a plain HF dir."""
    from core.models.load import build_tiny

    root = tmp_path_factory.mktemp("pair")
    donor, tok = build_tiny(num_layers=4, seed=0)
    donor.save_pretrained(root / "donor")
    tok.save_pretrained(root / "donor")
    run_task(["model=tiny", "pruner=taylor", "layers=all", "ratio=0.5", "logger=none", "eval=none"], root / "prune")
    return root / "prune" / "model", root / "donor"


def test_replace_writes_a_loadable_hybrid_with_info_and_readme(pair, tmp_path):
    base, donor = pair
    value, m = run_task(["task=replace", f"replacement.base={base}", f"replacement.donor={donor}",
                         "replacement.layers=[1,3]", "replacement.description=two restored", "replacement.score=0.57",
                         "replacement.score_metric=mmlu", "logger=none", "eval.ppl.max_tokens=256",
                         "eval.generation.max_new_tokens=4"], tmp_path / "run")
    assert m["status"] == "completed" and value == m["eval"]["model"]["ppl"]["value"]
    out = Path(m["checkpoint"]["path"])  # <run dir>/<output_name>/ (default llama_replaced_1_3)
    info = json.loads((out / "checkpoint_info.json").read_text())
    assert info["replaced_layers"] == [1, 3] and info["description"] == "two restored"
    assert info["score"] == {"metric": "mmlu", "value": 0.57, "source": "given"} and info["mmlu_score"] == 0.57
    assert "creation_time" in info and info["base"] == str(base) and info["donor"] == str(donor)
    assert "task=evaluate model=" in (out / "README.txt").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert [l["intermediate_size"] for l in cfg["layer_configs"]] == [64, 128, 64, 128]
    # the checkpoint test of the seed: generation check + limited evaluation, one command
    _, ev = run_task(["task=evaluate", f"model={out}", "logger=none", "eval=quick", "eval.ppl.max_tokens=256",
                      "eval.generation.max_new_tokens=4"], tmp_path / "eval")
    assert ev["status"] == "completed" and ev["eval"]["model"]["generation"]["new_tokens"] == 4


@pytest.mark.parametrize("layers,match", [("[1,9]", "[9] out of range: the model has 4 layers"),
                                          ("[2,2]", "layer(s) [2] given more than once"),
                                          ("[]", "task=replace needs replacement.layers")])
def test_replace_bad_layers(pair, tmp_path, layers, match):
    base, donor = pair
    with pytest.raises(SystemExit):
        run_task(["task=replace", f"replacement.base={base}", f"replacement.donor={donor}",
                  f"replacement.layers={layers}", *FAST], tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "failed" and match in m["error"]["message"]
    assert not [p for p in tmp_path.iterdir() if (p / "config.json").exists()]  # no checkpoint, whatever its name


def test_replace_refuses_a_donor_of_another_width(pair, tmp_path):
    from core.models.load import build_tiny

    base, _ = pair
    other, tok = build_tiny(num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit):
        run_task(["task=replace", f"replacement.base={base}", f"replacement.donor={tmp_path / 'other'}",
                  "replacement.layers=[1]", *FAST], tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "differ in hidden width (64 vs 32)" in m["error"]["message"]


SEARCH = ["task=search", "search.k=[1,2]", "search.tokens=64", "search.budget=6", *FAST]


def test_search_finds_the_exhaustive_optimum_and_saves_the_best(pair, tmp_path):
    base, donor = pair
    value, m = run_task([*SEARCH, f"replacement.base={base}", f"replacement.donor={donor}",
                         "search.strategies=[exhaustive,evolve,score_topk,random]", "search.save_best=true",
                         "eval=quick", "eval.ppl.max_tokens=256"], tmp_path / "run")
    assert m["status"] == "completed"
    res = json.loads((tmp_path / "run" / "search" / "results.json").read_text())
    ref = res["reference"]
    assert ref["base"] > ref["donor"] >= 0  # restoring every layer removes the damage
    for k in ("1", "2"):
        exhaustive = res["k"][k]["exhaustive"]
        assert res["best"][k]["fitness"] == pytest.approx(exhaustive["best_fitness"])
        assert exhaustive["evaluations"] == (4 if k == "1" else 6)
        assert 0 < exhaustive["recovered"] <= 1
    assert value == pytest.approx(res["best"]["2"]["fitness"])
    ppl = res["eval_ppl"]["ppl"]  # held-out text (random tiny weights: no ordering is promised here)
    assert set(ppl) == {"base", "k1", "k2", "donor"} and res["eval_ppl"]["source"] == "boolq"
    assert all(v > 1 for v in ppl.values()) and set(res["eval_ppl"]["recovered"]) == {"k1", "k2"}
    assert m["optimized_metric"]["name"] == "fitness"
    for k in (1, 2):
        info = json.loads((tmp_path / "run" / "search" / f"best_k{k}" / "checkpoint_info.json").read_text())
        assert info["replaced_layers"] == res["best"][str(k)]["layers"]
        assert (tmp_path / "run" / "search" / f"convergence_k{k}.png").is_file()


@pytest.mark.parametrize("args,match", [(["search.k=[5]"], "search.k=[5]: [5] larger than the model's 4 layers"),
                                        (["search.k=[0]"], "each k must be a positive number"),
                                        (["search.strategies=[annealing]"], "search.strategies: ['annealing']")])
def test_search_bad_input(pair, tmp_path, args, match):
    base, donor = pair
    with pytest.raises(SystemExit):
        run_task([*SEARCH, f"replacement.base={base}", f"replacement.donor={donor}", *args], tmp_path)
    assert match in json.loads((tmp_path / "metrics.json").read_text())["error"]["message"]


def test_killed_search_resumes_to_the_same_answer(pair, tmp_path):
    base, donor = pair
    common = [sys.executable, str(ROOT / "run.py"), "task=search", *FAST, "search.k=[2]", "search.strategies=[evolve]",
              "search.budget=5", f"replacement.base={base}", f"replacement.donor={donor}",
              f"paths.cache_dir={CACHE_DIR}", f"paths.outputs_root={tmp_path / 'outputs'}"]
    args = [*common, "search.tokens=512"]
    whole = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'whole'}"], capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = subprocess.Popen([*args, f"hydra.run.dir={tmp_path / 'outputs' / 'killed'}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    state = tmp_path / "outputs" / "killed" / "search" / "state" / "k2_evolve.json"
    t0 = time.time()

    def saved() -> int:  # evaluations in the state file so far
        try:
            return len(json.loads(state.read_text()).get("history", []))
        except (OSError, ValueError):
            return 0
    while saved() < 3:
        assert killed.poll() is None and time.time() - t0 < 300, "the search ended before it saved 3 evaluations"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = subprocess.run([*args, "search.resume=latest", f"hydra.run.dir={tmp_path / 'resumed'}"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "whole" / "search" / "results.json").read_text())["k"]["2"]["evolve"]
    b = json.loads((tmp_path / "resumed" / "search" / "results.json").read_text())["k"]["2"]["evolve"]
    for key in ("best", "best_fitness", "evaluations", "cache_hits"):
        assert a[key] == b[key], key
    # a state from another configuration is refused with the reason
    other = subprocess.run([*common, "search.tokens=256", "search.resume=latest", f"hydra.run.dir={tmp_path / 'other'}"],
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 1 and "tokens" in other.stderr and "Traceback" not in other.stderr


def test_search_with_an_lm_eval_fitness(pair, tmp_path):
    """The seed's fitness: 1 - accuracy of an lm-eval task on the hybrid (a few items: the wiring, not a score).
    The best hybrid is stored as the seed's scripts stored it: the accuracy (mmlu_score for an MMLU task), the
    README.txt of task=replace, and the minimised fitness beside them under its own name."""
    base, donor = pair
    _, m = run_task(["task=search", *FAST, f"replacement.base={base}", f"replacement.donor={donor}",
                     "search.fitness=lm_eval", "search.task=mmlu_high_school_geography:0", "search.limit=4",
                     "search.k=[1]", "search.strategies=[score_topk]", "search.budget=5", "search.tokens=64",
                     "search.save_best=true"], tmp_path)
    res = json.loads((tmp_path / "search" / "results.json").read_text())
    entry = res["k"]["1"]["score_topk"]
    assert m["status"] == "completed" and entry["evaluations"] == 4
    assert all(0.0 <= h["fitness"] <= 1.0 and h["fitness"] * 4 == round(h["fitness"] * 4) for h in entry["history"])
    best = res["best"]["1"]
    assert best["accuracy"] == 1.0 - best["fitness"] and best["task"] == "mmlu_high_school_geography"
    assert set(res["reference_accuracy"]) == {"base", "donor"}
    out = tmp_path / "search" / "best_k1"
    info = json.loads((out / "checkpoint_info.json").read_text())
    assert info["mmlu_score"] == best["accuracy"] == info["score"]["value"]
    assert info["score"]["metric"] == "mmlu_high_school_geography"
    assert info["fitness"] == {"metric": "lm_eval", "value": best["fitness"], "direction": "minimize"}
    readme = (out / "README.txt").read_text()
    assert f"replaced layers (taken from the donor): {best['layers']}" in readme and "task=search" in readme


def test_a_base_given_as_a_path_loads_in_its_own_dtype(pair, tmp_path):
    """A path base (a Llamba-8B dir, say) loads in its checkpoint's dtype, not float32; replacement.dtype overrides."""
    import torch

    from core.models.load import build_tiny

    _, donor = pair
    base16 = tmp_path / "base16"
    model, tok = build_tiny(num_layers=4, seed=1)
    model.to(torch.bfloat16).save_pretrained(base16)
    tok.save_pretrained(base16)
    for extra, want in (([], "bfloat16"), (["replacement.dtype=float32"], "float32")):
        run = tmp_path / f"run_{want}"
        _, m = run_task(["task=replace", f"replacement.base={base16}", f"replacement.donor={donor}",
                         "replacement.layers=[2]", *FAST, *extra], run)
        assert m["status"] == "completed"
        info = json.loads((Path(m["checkpoint"]["path"]) / "checkpoint_info.json").read_text())
        assert info["base_model"]["dtype"] == want and info["base_model"]["device"] == "cpu"
        saved = json.loads((Path(m["checkpoint"]["path"]) / "config.json").read_text())
        assert saved.get("torch_dtype", saved.get("dtype")) == want


def test_the_ga_settings_come_from_the_command_line(pair, tmp_path):
    """The seed GA's knobs: population, offspring, tournament, mutation and the sets to start from, recorded in the
    search's state (its resume fingerprint); a start set of the wrong size or past the depth fails before loading."""
    base, donor = pair
    args = ["task=search", *FAST, f"replacement.base={base}", f"replacement.donor={donor}", "search.k=[2]",
            "search.strategies=[ga]", "search.budget=6", "search.tokens=64", "search.population=4",
            "search.offspring=2", "search.tournament=2", "search.mutation=0.9", "search.initial=[[1,3]]"]
    _, m = run_task(args, tmp_path / "ga")
    assert m["status"] == "completed", m.get("error")
    state = json.loads((tmp_path / "ga" / "search" / "state" / "k2_ga.json").read_text())
    fp = state["fingerprint"]
    assert (fp["population"], fp["offspring"], fp["tournament"], fp["mutation"]) == (4, 2, 2, 0.9)
    assert fp["initial"] == [[1, 3]]
    first = [e["candidate"] for e in state["history"]][:1]
    assert first == [[1, 3]]  # the given set is scored first
    for i, (bad, match) in enumerate((("search.initial=[[1,9]]", "past the model's 4"),
                                      ("search.initial=[[1]]", "match no k"), ("search.mutation=1.5", "mutation=1.5"))):
        with pytest.raises(SystemExit):
            run_task([*args[:-1], bad], tmp_path / f"bad{i}")
        assert match in json.loads((tmp_path / f"bad{i}" / "metrics.json").read_text())["error"]["message"]
