"""task=report: one self-contained offline HTML page of a sweep, checked in a real headless Chromium (Debian's
/usr/bin/chromium driven by playwright; never a downloaded browser) and through the CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.html_report import write_report
from conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# job -> (method, ratio, pruned ppl, kept %); base ppl 20.0 in every completed job
COMPLETED = {"0": ("taylor", 0.25, 25.0, 80.0), "1": ("l2", 0.25, 30.0, 80.0), "2": ("wanda", 0.5, 40.0, 60.0)}
INJECTED = '<img src=x onerror="document.title=\'pwned\'"> & "quoted"'  # a hostile error message: text only


def _ev(ppl: float, acc: float) -> dict:
    return {"ppl": {"value": ppl, "seq_len": 128, "tokens": 4064, "source": "boolq"},
            "tasks": {"boolq": {"acc": acc, "status": "completed"}}, "task_average": acc}


def _completed(method: str, ratio: float, ppl: float, kept: float) -> dict:
    return {"status": "completed", "task": "prune", "method": method,
            "compression": {"unit": "groups", "amount": ratio},
            "config": {"ratio": ratio, "model": {"name": "smollm2"}, "pruner": {"name": method},
                       "layers": {"attention": {"start": 3, "end": 27}, "mlp": {"start": 3, "end": 27}}},
            "params": {"base": 1000, "pruned": int(10 * kept), "kept_pct": kept},
            "eval": {"base": _ev(20.0, 0.6), "pruned": _ev(ppl, 0.5)}}


def _unfinished(status: str, message: str, method: str) -> dict:
    return {"status": status, "task": "prune", "pid": 1, "host": "elsewhere",
            "config": {"ratio": 0.5, "model": {"name": "smollm2"}, "pruner": {"name": method}},
            "error": {"type": "DataError", "message": message, "traceback": "Traceback ..."}}


def _png(path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(6), [0.1, 0.3, 0.2, 0.5, 0.4, 0.25], color="#4c72b0")
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A sweep dir as a multirun leaves it: five jobs (three completed, one failed, one killed), the sweep's
    pareto plot (the real one, from the real table) and one job's analysis plot."""
    from analysis.plots import pareto
    from analysis.results_table import collect

    root = tmp_path_factory.mktemp("multirun") / "11-00-00"
    records = {job: _completed(*spec) for job, spec in COMPLETED.items()}
    records["3"] = _unfinished("failed", f"{INJECTED}\nsecond line of detail", "taylor")
    records["4"] = _unfinished("killed", "terminated by signal SIGTERM", "l1")
    for job, m in records.items():
        (root / job).mkdir(parents=True)
        (root / job / "metrics.json").write_text(json.dumps(m))
    assert pareto(collect([root]), root / "pareto_ppl.png", y="ppl") is not None
    _png(root / "heatmap_ppl_attn_layers.png", "a layer-range heatmap")
    _png(root / "0" / "analysis" / "sparsity.png", "sparsity of job 0")  # the prune run's own analysis
    _png(root / "analysis" / "2" / "module_heatmap.png", "modules of job 2")  # the sweep's batch analysis of job 2
    (root / "batch_analysis_results.json").write_text(json.dumps({"models": [
        {"name": "2", "format": "prunelab", "status": "ok", "summary": {"total_params": 600, "reduction_ratio": 0.4}},
        {"name": "3", "format": "unknown", "status": "skipped", "reason": "no weights: the run failed"}]}))
    (root / "notes.png").write_text("not an image")  # named .png, but no PNG: listed, never embedded
    return root


def _browser_page(p, errors: list[str], requests: list[str]):
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (make setup installs Debian's chromium)")
    browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.on("request", lambda r: requests.append(r.url))
    return browser, page


def _column(page, table: str, name: str) -> list[str]:
    """The sort keys (data-v, else the text) of one column of a table, in the order shown."""
    return page.eval_on_selector(f"#{table}", """(t, name) => {
        const i = Array.from(t.tHead.rows[0].cells).findIndex(th => th.textContent.trim() === name);
        return Array.from(t.tBodies[0].rows).map(r => r.cells[i].dataset.v ?? r.cells[i].textContent.trim());
    }""", name)


def test_report_in_headless_chromium(sweep, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the [test] extra)")
    out = write_report([sweep], tmp_path / "report.html", title="Ratios x pruners")
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser, page = _browser_page(p, errors, requests)
        try:
            page.goto(out.as_uri())
            page.wait_for_load_state("load")
            assert page.title() == "Ratios x pruners"  # the hostile error message ran nothing

            # every run is shown: the base row merges the completed jobs, then one row per job
            assert page.text_content("#n-runs") == "5"
            assert page.text_content("#n-completed") == "3" and page.text_content("#n-incomplete") == "2"
            shown = page.eval_on_selector_all("tr[data-run]", "rows => rows.map(r => r.dataset.run)")
            assert {j for s in shown for j in s.split("; ")} == {"0", "1", "2", "3", "4"}
            assert page.locator("#results tbody tr").count() == 4  # base + three compressed models
            assert page.locator("#incomplete tbody tr").count() == 2
            failed = page.locator("#incomplete tr[data-run='3']")
            assert INJECTED in failed.inner_text() and "second line" not in failed.inner_text()
            assert failed.locator("img").count() == 0 and "failed" in failed.inner_text()

            # click a header to sort: ascending, then descending, empty cells last
            assert _column(page, "results", "method") == ["base", "l2", "taylor", "wanda"]  # collect's order
            page.click("#results th:text-is('ppl')")
            assert [float(v) for v in _column(page, "results", "ppl")] == [20.0, 25.0, 30.0, 40.0]
            page.click("#results th:text-is('ppl')")
            assert [float(v) for v in _column(page, "results", "ppl")] == [40.0, 30.0, 25.0, 20.0]
            assert _column(page, "results", "method") == ["wanda", "l2", "taylor", "base"]
            page.click("#incomplete th:text-is('status')")
            assert _column(page, "incomplete", "status") == ["failed", "killed"]

            # the filter hides the rows that do not match, and counts the rest
            page.fill("#filter", "WANDA")
            assert page.locator("tr[data-run]:visible").count() == 1 and page.text_content("#n-shown") == "1"
            page.fill("#filter", "")
            assert page.locator("tr[data-run]:visible").count() == 6 and page.text_content("#n-shown") == "6"

            # plots: embedded, decoded by the browser, the sweep's first; each model's folded away until opened
            images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.src.slice(0, 22), i.naturalWidth])")
            assert len(images) == 4 and all(src == "data:image/png;base64," and w > 100 for src, w in images)
            assert page.eval_on_selector_all("figure img", "imgs => imgs.map(i => i.alt)") == [
                "pareto_ppl.png", "heatmap_ppl_attn_layers.png", "sparsity.png", "module_heatmap.png"]
            folded = page.locator("details img")
            assert folded.count() == 2 and not folded.first.is_visible()
            page.click("details summary >> nth=0")
            assert folded.first.is_visible() and not folded.last.is_visible()
            assert page.locator("#batch tbody tr").count() == 2 and "no weights" in page.inner_text("#batch")
            assert "notes.png (not a PNG)" in page.inner_text("main")

            box = page.locator("#results").bounding_box()
            assert box is not None and box["width"] > 400 and box["height"] > 80
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert all(u.startswith(("file://", "data:")) for u in requests), requests  # nothing from outside the file
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 30_000
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] > 900 and pixels.shape[1] == 1280 and pixels.std() > 0.05  # a page, not a blank


def test_page_is_self_contained_and_escaped(sweep, tmp_path):
    page = write_report([sweep], tmp_path / "r.html").read_text()
    refs = _references(page)
    assert len(refs) == 4 and all(r.startswith("data:image/png;base64,") for r in refs)  # the two real PNGs
    assert "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page  # the browser refuses any load the page did not embed
    assert html_escaped(INJECTED) in page and INJECTED not in page
    assert page.count('data-run="') == 6 and 'id="n-runs">5<' in page


def test_any_folder_of_runs_and_the_embedding_budget(sweep, tmp_path):
    """A folder of sweeps names its jobs by their paths inside it; two run dirs by their own names; plots over
    the byte budget are listed, not embedded."""
    page = write_report([sweep.parent], tmp_path / "a.html").read_text()
    assert 'data-run="11-00-00/3"' in page and 'id="n-runs">5<' in page
    page = write_report([sweep / "0", sweep / "3"], tmp_path / "b.html", max_embed_bytes=1000).read_text()
    assert re.findall(r'data-run="([^"]*)"', page) == ["0", "0", "3"]  # base, taylor, the failed job
    assert 'id="n-runs">2<' in page and "<img" not in page and "sparsity.png (page size limit)" in page


def _references(page: str) -> list[str]:
    """Every src / href / action / srcset / poster of the page's real elements (escaped text is no element)."""
    from html.parser import HTMLParser

    refs: list[str] = []

    class Refs(HTMLParser):
        def handle_starttag(self, tag, attrs):
            refs.extend(v or "" for k, v in attrs if k in ("src", "href", "action", "srcset", "poster", "data"))

    Refs().feed(page)
    return refs


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def test_report_with_no_record_is_one_clear_error(tmp_path):
    from core.run.errors import DataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no run record"):
        write_report([tmp_path / "empty"], tmp_path / "empty" / "report.html")
    assert not (tmp_path / "empty" / "report.html").exists()


def _cli(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, "logger=none", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_cli_writes_the_report_next_to_the_sweep(sweep, tmp_path):
    copy = Path(shutil.copytree(sweep, tmp_path / "11-00-00"))
    run_dir = copy / "report-run"  # inside the sweep: the report's own record is not one of its runs
    proc = _cli(["task=report", f"runs=[{copy}]", "next_to_inputs=true"], run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (copy / "report.html").read_text()
    assert 'id="n-runs">5<' in page and page.count('data-run="') == 6 and "report-run" not in page
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "completed" and m["report"]["copy"] == str(copy / "report.html")
    assert (run_dir / "report.html").read_bytes() == (copy / "report.html").read_bytes()  # the run's own, copied


@pytest.mark.parametrize("runs, fragment", [("[/no/such/sweep]", "runs: no such run dir(s): /no/such/sweep"),
                                            ("[]", "runs: give the sweep dir")])
def test_cli_bad_runs_is_one_clear_line(tmp_path, runs, fragment):
    proc = _cli(["task=report", f"runs={runs}"], tmp_path / "run")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "[ERROR]" in line or line.startswith("error:")]
    assert len(errors) == 1 and fragment in proc.stderr, proc.stderr[-3000:]  # the problem follows on its own line
    assert not list(tmp_path.rglob("report.html"))


def test_a_batch_analyze_run_dir_is_read_from_its_results_folder(sweep, tmp_path):
    """task=batch_analyze writes into <run>/<output_name>/ (baselines_analysis/ by default): its table and each
    model's plots are found there."""
    run = tmp_path / "batch_run"
    shutil.copytree(sweep / "0", run)
    folder = run / "baselines_analysis"
    _png(folder / "analysis" / "wanda_0.2" / "sparsity.png", "wanda 20%")
    (folder / "batch_analysis_results.json").write_text(json.dumps({"models": [
        {"name": "wanda_0.2", "format": "prunelab", "status": "ok",
         "summary": {"total_params": 700, "reduction_ratio": 0.2236}}]}))
    page = write_report([run], tmp_path / "r.html").read_text()
    assert "wanda_0.2" in page and "22.36" in page
    assert "wanda_0.2 (1 plot)" in page
