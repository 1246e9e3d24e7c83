"""The fast paths of loading (core.models.load._read_plain_llama) and of the built-in texts (core.data.text's cache
under <cache_dir>/text): each gives exactly what the slow path gives, and steps aside when it cannot."""

from __future__ import annotations

import json

import pytest
import torch

import core.data.text as text
import core.models.load as load
from core.models.load import build_tiny, load_hf_dir
from core.run.errors import LoadError


def _saved(tmp_path, tied: bool, dtype: str = "float32"):
    model, tok = build_tiny(num_layers=2, hidden_size=64, intermediate_size=96, seed=3)
    model.to(getattr(torch, dtype))
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


def _slow(path, dtype: str = "float32"):
    original = load._read_plain_llama
    load._read_plain_llama = lambda *a: None
    try:
        return load_hf_dir(path, dtype=dtype)
    finally:
        load._read_plain_llama = original


@pytest.mark.parametrize("tied,dtype", [(False, "float32"), (True, "float32"), (False, "bfloat16"),
                                        (True, "float16")])
def test_fast_read_is_from_pretrained(tmp_path, tied, dtype):
    """Stored in the dtype asked for (Llama-3-8B in bfloat16, say): read in place, exactly as from_pretrained."""
    path = _saved(tmp_path, tied, dtype)
    cfg = json.loads((path / "config.json").read_text())
    assert load._read_plain_llama(path, cfg, dtype) is not None  # the fast path is the one taken
    assert load._read_plain_llama(path, cfg, "auto") is not None  # auto: the stored dtype
    fast, _ = load_hf_dir(path, dtype=dtype)
    slow, _ = _slow(path, dtype)
    assert next(fast.parameters()).dtype == getattr(torch, dtype)
    assert type(fast) is type(slow) and not fast.training
    a, b = fast.state_dict(), slow.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = dict(fast.named_buffers()), dict(slow.named_buffers())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fast.config.to_dict() == slow.config.to_dict()
    assert fast.generation_config.to_dict() == slow.generation_config.to_dict()
    assert (fast.lm_head.weight.data_ptr() == fast.model.embed_tokens.weight.data_ptr()) is tied
    ids = torch.randint(0, 259, (2, 9))
    assert torch.equal(fast(ids).logits, slow(ids).logits)


def test_fast_read_steps_aside(tmp_path):
    path = _saved(tmp_path, False)
    cfg = json.loads((path / "config.json").read_text())
    assert load._read_plain_llama(path, cfg, "bfloat16") is None  # another dtype: from_pretrained casts
    bad = dict(cfg, intermediate_size=80)  # config.json no longer matches the weights
    (path / "config.json").write_text(json.dumps(bad))
    assert load._read_plain_llama(path, bad, "float32") is None
    with pytest.raises((LoadError, RuntimeError), match="mismatch|wrong shape"):  # from_pretrained refuses
        load_hf_dir(path)


def test_text_cache_is_the_built_text_and_follows_its_inputs(tmp_path, monkeypatch):
    built = text.TextSource("sciq", "built", ("one paragraph", "two\nlines"))
    calls = []
    monkeypatch.setattr(text, "_sciq", lambda: calls.append(1) or built)
    inputs = tmp_path / "olmo" / "sciq" / "none" / "validation"
    inputs.mkdir(parents=True)
    (inputs / "data.arrow").write_bytes(b"v1")
    monkeypatch.setattr(text, "olmo_datasets_dir", lambda: tmp_path / "olmo")
    cache = tmp_path / "cache"
    cache.mkdir()
    text._built_source.cache_clear()
    first = text.load_documents(text.TextSpec("sciq"), cache_dir=cache)
    text._built_source.cache_clear()
    second = text.load_documents(text.TextSpec("sciq"), cache_dir=cache)
    assert first == second == built and len(calls) == 1  # the second one read <cache>/text/sciq.json
    (inputs / "data.arrow").write_bytes(b"v2!")  # an input changed: built again
    text._built_source.cache_clear()
    assert text.load_documents(text.TextSpec("sciq"), cache_dir=cache) == built and len(calls) == 2
    text._built_source.cache_clear()
