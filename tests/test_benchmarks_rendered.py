"""Benchmark figures are generated, never pasted: docs/benchmarks.md and the README's brief table are what
tests/bench/render.py makes of tests/bench/results/*.jsonl, and every results line says when, on what and where."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tests/bench/results"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "tests/bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


render = _module("render")
common = _module("_common")


def test_rendered_pages_are_up_to_date():
    stale = render.stale()
    assert not stale, f"stale: {', '.join(stale)}; run python tests/bench/render.py and commit the result"


def test_every_results_line_says_bench_date_commit_and_machine():
    files = sorted(RESULTS.glob("*.jsonl"))
    assert files, "no results files"
    bench_scripts = {p.stem.removesuffix("_bench") for p in (ROOT / "tests/bench").glob("*_bench.py")}
    for path in files:
        assert path.stem in bench_scripts, f"{path.name}: no tests/bench/{path.stem}_bench.py writes it"
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines, f"{path.name} is empty"
        for n, raw in enumerate(lines, 1):
            line = json.loads(raw)
            where = f"{path.name}:{n}"
            assert isinstance(line.get("bench"), str) and line["bench"], where
            datetime.fromisoformat(line["date"])
            assert isinstance(line.get("commit"), str) and line["commit"], where
            assert isinstance(line.get("machine"), dict) and {"cpu", "cores", "torch_threads", "gpu"} <= set(
                line["machine"]), where
            # a line either ran here (the writer's machine fields) or says where it was found
            assert line.get("source") or line["machine"]["cpu"], f"{where}: neither measured here nor sourced"


def test_every_benchmark_has_a_section():
    assert {b.stem for b in render.BENCHES} == {p.stem.removesuffix("_bench")
                                                 for p in (ROOT / "tests/bench").glob("*_bench.py")}


def _results(tmp_path: Path, *lines: str) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    (d / "prune.jsonl").write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    return d


GOOD = json.dumps({"bench": "prune", "threads": 1, "prune_s": 1.5, "config": {"taylor": "param_first"},
                   "date": "2026-01-02T03:04:05+00:00", "commit": "abc1234",
                   "machine": {"cpu": "x", "cores": 2, "torch_threads": 1, "gpu": None}})


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not a JSON line"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({**json.loads(GOOD), "date": "yesterday"}), "not ISO 8601"),
    *((json.dumps({k: v for k, v in json.loads(GOOD).items() if k != key}), f"no '{key}'")
      for key in ("bench", "date", "commit", "machine")),
])
def test_a_malformed_line_fails_the_render_naming_file_and_line(tmp_path, bad, message):
    results = _results(tmp_path, GOOD, bad)
    with pytest.raises(render.RenderError, match=rf"prune\.jsonl:2: .*{message}"):
        render.load(results)
    with pytest.raises(render.RenderError, match=message):
        render.rendered(ROOT, results)


def test_the_page_shows_the_newest_line_and_keeps_the_older_one_as_history(tmp_path):
    older = json.loads(GOOD)
    newer = {**older, "prune_s": 2.75, "date": "2026-02-01T00:00:00+00:00", "commit": "def5678+dirty"}
    page = render.benchmarks_page(_results(tmp_path, json.dumps(newer), json.dumps(older)))
    assert "| 2.75 |" in page and "def5678+dirty" in page and "| 1.5 |" not in page
    assert "History: 2 lines in `tests/bench/results/prune.jsonl`" in page


def test_a_block_needs_its_markers(tmp_path):
    (tmp_path / "README.md").write_text("# x\n\nno markers here\n")
    b = render.Block("README.md", "results", lambda _r: "table")
    with pytest.raises(render.RenderError, match=r"README.md: needs one line <!-- results:begin -->"):
        render.apply(b, (tmp_path / "README.md").read_text(), RESULTS)
    text = "a\n<!-- results:begin -->\nold\n<!-- results:end -->\nb\n"
    assert render.apply(b, text, RESULTS) == "a\n<!-- results:begin -->\ntable\n<!-- results:end -->\nb\n"


def test_check_exits_1_naming_the_stale_file_and_render_fixes_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(render, "BLOCKS", [b for b in render.BLOCKS if b.path in ("docs/benchmarks.md", "README.md")])
    results = _results(tmp_path, GOOD)
    root = tmp_path / "repo"
    root.mkdir()
    (root / "README.md").write_text("intro\n<!-- results:begin -->\n<!-- results:end -->\nrest\n")
    assert render.main(["--check"], root, results) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stale: docs/benchmarks.md, README.md" in err
    assert render.main([], root, results) == 0
    assert render.main(["--check"], root, results) == 0
    readme = (root / "README.md").read_text()
    assert readme.startswith("intro\n<!-- results:begin -->\n| benchmark |")
    assert readme.endswith("<!-- results:end -->\nrest\n")
    assert "| 1.5 |" in (root / "docs/benchmarks.md").read_text()
    (root / "README.md").write_text("markers gone\n")
    assert render.main(["--check"], root, results) == 2
    assert "README.md: needs one line <!-- results:begin -->" in capsys.readouterr().err


def test_check_from_the_command_line_is_one_line():
    out = subprocess.run([sys.executable, str(ROOT / "tests/bench/render.py"), "--check"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""


def test_record_prints_the_line_as_before_and_appends_it_with_date_commit_machine(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.delenv("PRUNELAB_BENCH_RECORD", raising=False)
    result = {"bench": "prune", "threads": 1, "prune_s": 1.25}
    common.record(result, "tests/bench/prune_bench.py")
    common.record({"x": 1}, "tests/bench/export_bench.py", threads=3)
    assert capsys.readouterr().out == json.dumps(result) + "\n" + json.dumps({"x": 1}) + "\n"
    line = json.loads((tmp_path / "prune.jsonl").read_text())
    assert {k: line[k] for k in result} == result
    datetime.fromisoformat(line["date"])
    assert line["commit"] and line["machine"]["torch_threads"] == 1 and line["machine"]["cores"]
    other = json.loads((tmp_path / "export.jsonl").read_text())
    assert other["bench"] == "export" and other["machine"]["torch_threads"] == 3
    monkeypatch.setenv("PRUNELAB_BENCH_RECORD", "0")
    common.record(result, "tests/bench/prune_bench.py")
    assert len((tmp_path / "prune.jsonl").read_text().splitlines()) == 1


def test_the_default_rows_headline_skips_lines_run_with_extra_overrides():
    """The README's quality headlines name the default (``tokens=auto``, no overrides): a newer line of the same row
    run with an override, or without the zero-shot average where the headline gives it, is not the default's."""
    base = {"row": "obs:comp:uniform", "budget": {"ratio": 0.25}, "tokens_option": "auto", "overrides": [],
            "calibration_tokens": 32256, "ppl_ratio": {"austen_holdout": 1.33, "boolq": 2.03},
            "damage_vs_reference": {"austen_holdout": 0.19, "boolq": 0.27},
            "zeroshot": {"average": 0.43, "limit": 500}, "zeroshot_average_minus_dense": -0.01,
            "date": "2026-01-01T00:00:00+00:00"}
    tuned = {**base, "overrides": ["pruner.attention_ratio=0.34"], "zeroshot": {"average": 0.5, "limit": 500},
             "date": "2026-01-02T00:00:00+00:00"}
    plain = {**base, "zeroshot": None, "date": "2026-01-03T00:00:00+00:00"}
    got = render._quality_headline([base, tuned, plain], "s", "obs:comp:uniform", 0.25, "auto", zeroshot=True)
    assert got is not None and got[2] is base and "zero-shot average 0.43" in got[1] and "limit 500" in got[1]
    got = render._quality_headline([base, tuned, plain], "s", "obs:comp:uniform", 0.25, "auto")
    assert got[2] is plain and "of LLM-Pruner's damage" in got[1]
