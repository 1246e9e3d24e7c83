"""The embedded model's converted cache (issue 25, item 4): keyed by its source, and tokenizing as the GGUF does."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from conftest import CACHE_DIR
from core.models.ref import ModelRef, check_gguf_cache, gguf_cache_dir, gguf_sha256, model_config, model_depth
from core.run.errors import LoadError


@pytest.fixture
def package(tmp_path, monkeypatch):
    """An installed package ``fakegguf`` holding two files (any bytes: only their identity matters here)."""
    pkg = tmp_path / "site" / "fakegguf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.gguf").write_bytes(b"A" * 1000)
    (pkg / "b.gguf").write_bytes(b"B" * 1000)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    yield pkg
    sys.modules.pop("fakegguf", None)


def _ref(file: str, name: str = "m") -> ModelRef:
    return ModelRef(name=name, kind="gguf", gguf_package="fakegguf", gguf_file=file)


def test_the_key_follows_the_file_not_the_name(package, tmp_path):
    a, src_a = gguf_cache_dir(_ref("a.gguf"), tmp_path)
    b, src_b = gguf_cache_dir(_ref("b.gguf"), tmp_path)
    assert a != b and a.name.startswith("m-") and src_a["file"] == "a.gguf" and src_b["size"] == 1000
    assert src_a["sha256"] != src_b["sha256"]
    (package / "a.gguf").write_bytes(b"C" * 1000)  # same name and size, other bytes: another key
    assert gguf_cache_dir(_ref("a.gguf"), tmp_path)[0] != a


def test_the_hash_is_remembered_by_mtime(package, tmp_path):
    f = package / "a.gguf"
    first = gguf_sha256(f, tmp_path)
    book = json.loads((tmp_path / "models" / ".gguf-sha256.json").read_text())
    entry = book[str(f.resolve())]
    assert entry["sha256"] == first and entry["size"] == 1000
    entry["sha256"] = "remembered"  # read back while size and mtime are unchanged: the file is not hashed again
    (tmp_path / "models" / ".gguf-sha256.json").write_text(json.dumps(book))
    assert gguf_sha256(f, tmp_path) == "remembered"


def test_a_cache_dir_of_another_source_is_refused(package, tmp_path):
    target, src = gguf_cache_dir(_ref("a.gguf"), tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    (target / "source.json").write_text(json.dumps({**src, "file": "b.gguf"}))
    for read in (model_config, model_depth):
        with pytest.raises(LoadError, match="is not the conversion of fakegguf/a.gguf"):
            read(_ref("a.gguf"), tmp_path)
    (target / "source.json").unlink()  # a dir without its source is not trusted either
    with pytest.raises(LoadError, match="source.json says None"):
        check_gguf_cache(target, src)


def test_the_old_unkeyed_cache_is_never_read(tmp_path):
    """An earlier version's ``models/smollm2`` (keyed by the name only) says nothing about the model now."""
    from recipes._common import resolve_model

    old = tmp_path / "models" / "smollm2"
    old.mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"num_hidden_layers": 7, "hidden_size": 64, "intermediate_size": 1,
                                                 "num_attention_heads": 1, "vocab_size": 10}))
    assert model_depth(resolve_model("smollm2"), tmp_path) == 30  # the GGUF's own block_count


TEXT = ("In 2023, 12345 people paid $3.14 each (or 1,000,000 in total) on 07/12/2026 at 10:45.\n\n"
        "  b  1a2b 3  4   5\t6\n\n" + "Order #42: 7 apples, 18 pears, 999 plums; 0.5 kg for 12.99 EUR. " * 3)


def test_the_cached_tokenizer_tokenizes_as_the_gguf():
    """transformers' GGUF conversion drops SmolLM2's one-digit pre-tokenizer; the cached tokenizer has it back, and
    splits every text exactly as llama.cpp does with the GGUF itself."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from core.data.text import TextSpec, load_documents
    from core.models.load import cached_gguf_dir
    from core.models.ref import gguf_path
    from recipes._common import resolve_model

    ref = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(cached_gguf_dir(ref, CACHE_DIR))
    llm = llama_cpp.Llama(model_path=str(gguf_path(ref.gguf_package, ref.gguf_file)), vocab_only=True, verbose=False)
    try:
        news = "\n\n".join(load_documents(TextSpec("news"), CACHE_DIR).documents[:400])
        for text in (TEXT, news):
            want = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            assert tok(text, add_special_tokens=False)["input_ids"] == want
    finally:
        llm.close()
