"""Offline text sources: Austen from the R database, BoolQ passages, local files; determinism; no overlap."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CACHE_DIR
from core.data.text import TextSpec, calibration_and_eval_sources, calibration_batch, eval_tokens, load_documents
from core.run.errors import DataError
from core.models.load import byte_tokenizer
from core.data.rdata import RDataError, read_lazyload


def test_austen_novels_from_r_database():
    src = load_documents(TextSpec("austen"), cache_dir=CACHE_DIR)
    assert len(src.documents) > 8000
    text = " ".join(src.documents[:200])
    assert "Dashwood" in text  # Sense and Sensibility comes first
    assert all(len(d) > 80 for d in src.documents)


def test_rdata_rejects_garbage(tmp_path):
    (tmp_path / "x.rdx").write_bytes(b"\x00\x00\x00\x10garbage-not-zlib")
    (tmp_path / "x.rdb").write_bytes(b"")
    with pytest.raises(RDataError):
        read_lazyload(tmp_path / "x")


def test_boolq_passages_unique():
    src = load_documents(TextSpec("boolq"))
    assert len(src.documents) == len(set(src.documents)) > 2500


def test_calibration_is_deterministic_for_a_seed():
    tok = byte_tokenizer()
    src = load_documents(TextSpec("austen"), cache_dir=CACHE_DIR)
    a = calibration_batch(tok, src, 6, 48, seed=1)
    b = calibration_batch(tok, src, 6, 48, seed=1)
    c = calibration_batch(tok, src, 6, 48, seed=2)
    assert a.shape == (6, 48) and torch.equal(a, b) and not torch.equal(a, c)


def test_same_source_is_split_without_overlap():
    calib, evals = calibration_and_eval_sources(TextSpec("boolq"), TextSpec("boolq"), CACHE_DIR)
    assert not set(calib.documents) & set(evals.documents)
    assert "calibration" in calib.name and "evaluation" in evals.name
    c2, e2 = calibration_and_eval_sources(TextSpec("austen"), TextSpec("boolq"), CACHE_DIR)
    assert c2.name == "austen" and e2.name == "boolq"


def test_text_and_jsonl_files(tmp_path):
    tok = byte_tokenizer()
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(f"Paragraph {i} " + "word " * 40 for i in range(30)))
    assert len(load_documents(TextSpec("text_file", str(txt))).documents) == 30
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps({"content": f"line {i} " + "x " * 50}) for i in range(20)))
    src = load_documents(TextSpec("text_file", str(jl), text_field="content"))
    assert calibration_batch(tok, src, 4, 32, 0).shape == (4, 32)
    assert eval_tokens(tok, src, 100).shape == (1, 100)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="b.jsonl:2"):
        load_documents(TextSpec("text_file", str(bad)))
