"""Recovery training text: rows, the held-out split, instructions with a chat template, and what is refused."""

from __future__ import annotations

import json

import pytest

from core.data.text import TextSpec, load_documents
from core.run.errors import DataError
from core.models.load import byte_tokenizer
from recovery.data import (DataSpec, check_disjoint, collate, heldout_rows, load_corpus, steps_for, training_rows)
from recovery_models import varied_file

CACHE = ".cache"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_packed_rows_are_full_and_deterministic(tok):
    corpus = load_corpus(DataSpec("austen"), CACHE)
    a = training_rows(tok, corpus, 12, 64, packing=True, seed=3, batch_tokens=128)
    assert len(a.ids) == 12 and all(len(r) == 64 for r in a.ids) and a.tokens == 12 * 64
    assert a.ids == training_rows(tok, corpus, 12, 64, packing=True, seed=3, batch_tokens=128).ids
    assert a.ids != training_rows(tok, corpus, 12, 64, packing=True, seed=4, batch_tokens=128).ids
    assert tok.eos_token_id in [t for r in a.ids for t in r]  # documents are joined by EOS
    # the first rows of a longer run are the rows of a shorter one: a resumed run reads the same data
    assert training_rows(tok, corpus, 24, 64, packing=True, seed=3, batch_tokens=128).ids[:12] == a.ids


def test_unpacked_rows_are_one_document_each(tok):
    corpus = load_corpus(DataSpec("news"), CACHE)
    rows = training_rows(tok, corpus, 6, 512, packing=False, seed=0, batch_tokens=8)
    assert len({len(r) for r in rows.ids}) > 1 and all(r[-1] == tok.eos_token_id or len(r) == 512 for r in rows.ids)
    ids, labels, mask = collate(rows, 0, 6, tok.pad_token_id)
    assert mask is not None and int(mask.sum()) == rows.tokens
    assert bool((labels[mask == 0] == -100).all())


def test_training_never_reads_the_held_out_split(tok):
    """The held-out split is core.data.text's evaluation split of the same text: evaluating on that text is safe."""
    corpus = load_corpus(DataSpec("austen"), CACHE)
    austen = load_documents(TextSpec("austen"), CACHE)
    assert corpus.heldout.documents == austen.split("evaluation").documents
    assert corpus.train.documents == austen.split("calibration").documents
    assert not set(corpus.train.documents) & set(corpus.heldout.documents)
    held = heldout_rows(tok, corpus, 64, 640)
    assert len(held.ids) == 10 and all(len(r) == 64 for r in held.ids)


def test_mix_gives_each_component_its_share_and_holds_each_out(tok):
    corpus = load_corpus(DataSpec("mix", mix={"austen": 0.5, "news": 0.5}), CACHE)
    assert [p.name for p in corpus.train.parts] == ["austen[train]", "news[train]"]
    for train, held in zip(corpus.train.parts, corpus.heldout.parts):
        assert not set(train.documents) & set(held.documents)
    rows = training_rows(tok, corpus, 10, 32, packing=True, seed=0, batch_tokens=64)
    texts = ["\n".join(p.documents) for p in corpus.train.parts]
    origin = []
    for r in rows.ids:
        piece = max(tok.decode(r).split("</s>"), key=len)  # the longest piece of one document
        origin.append([i for i, t in enumerate(texts) if piece in t])
    assert sorted(o for o in origin) == [[0]] * 5 + [[1]] * 5  # 50/50 by weight
    held = heldout_rows(tok, corpus, 32, 320)
    assert len(held.ids) == 10  # 160 tokens = 5 windows from each component


def test_instructions_use_the_chat_template_and_train_on_the_response(tok, tmp_path):
    path = tmp_path / "alpaca.jsonl"
    recs = [{"instruction": f"Say the number {i}.", "input": "in words" if i % 2 else "", "output": f"Number {i}."}
            for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    corpus = load_corpus(DataSpec("instructions", path=str(path)), CACHE)
    assert corpus.kind == "instructions" and len(corpus.train) == 18 and len(corpus.heldout) == 2
    rows = training_rows(tok, corpus, 4, 128, packing=True, seed=0, batch_tokens=8)
    text = tok.decode(rows.ids[0])
    assert text.startswith("<s>user\nSay the number") and "<s>assistant\nNumber" in text  # the tokenizer's template
    ids, labels, _ = collate(rows, 0, 1, tok.pad_token_id)
    trained = tok.decode([t for t in labels[0].tolist() if t != -100])
    assert trained.startswith("Number") and "Say the number" not in trained  # the prompt carries no loss
    full = training_rows(tok, corpus, 4, 128, packing=True, seed=0, batch_tokens=8, train_on_inputs=True)
    assert full.prompt_len == [0] * 4
    held = heldout_rows(tok, corpus, 128, 4096)
    assert len(held.ids) == 2 and all(p > 0 for p in held.prompt_len)


def test_instructions_without_a_chat_template_use_alpacas_prompt(tok, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"Task {i}", "input": "", "output": "Done."})
                              for i in range(4)))
    plain = byte_tokenizer()
    plain.chat_template = None
    corpus = load_corpus(DataSpec("instructions", path=str(path)), CACHE)
    rows = training_rows(plain, corpus, 2, 256, packing=True, seed=0, batch_tokens=8)
    assert "### Instruction:\nTask" in plain.decode(rows.ids[0]) and plain.decode(rows.ids[0]).endswith("Done.</s>")


def test_bad_instruction_records(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "x", "output": "y"}\n{"prompt": "no fields"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON object with 'instruction' and 'output'"):
        load_corpus(DataSpec("instructions", path=str(path)), CACHE)


def test_text_shorter_than_one_batch(tok, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("A short paragraph of text.\n\nAnd another one.\n")
    corpus = load_corpus(DataSpec("text_file", path=str(path)), CACHE)
    with pytest.raises(DataError, match=r"short.txt\[train\] has \d+ tokens, fewer than one batch of 256"):
        training_rows(tok, corpus, 8, 64, packing=True, seed=0, batch_tokens=256)


def test_a_file_copying_evaluation_text_is_refused(tmp_path):
    boolq = load_documents(TextSpec("boolq"), CACHE)
    path = varied_file(tmp_path / "mine.txt")
    path.write_text(boolq.documents[5] + "\n\n" + path.read_text())  # in the training split (the first 90%)
    corpus = load_corpus(DataSpec("text_file", path=str(path)), CACHE)
    with pytest.raises(DataError, match=r"1 paragraph\(s\) of the training text text_file:mine.txt are also in the "
                                        r"evaluation text boolq"):
        check_disjoint(corpus, [boolq])
    check_disjoint(load_corpus(DataSpec("text_file", path=str(varied_file(tmp_path / "ok.txt"))), CACHE), [boolq])


def test_the_evaluation_source_itself_is_split_not_refused():
    """Training on BoolQ's passages while evaluating on them reads only the first 90%; the evaluation the last 10%."""
    corpus = load_corpus(DataSpec("boolq"), CACHE)
    check_disjoint(corpus, [load_documents(TextSpec("boolq"), CACHE).split("evaluation")])


def test_length_from_steps_tokens_or_epochs():
    assert steps_for(None, None, 7, rows_per_step=4, seq_len=128) == 7
    assert steps_for(10_000, None, 7, rows_per_step=4, seq_len=128) == 20  # ceil(10000 / 512)
    assert steps_for(10_000, 2.0, 7, rows_per_step=4, seq_len=128, rows_in_epoch=30) == 15
