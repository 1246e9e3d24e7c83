"""SmolLM2-135M (embedded model): header analysis agrees with the loaded module; size explained."""

from __future__ import annotations

import pytest

from conftest import CACHE_DIR


@pytest.mark.integration
def test_smollm2_headers_match_module(tmp_path):
    from analysis.report import write_analysis
    from analysis.structure import structure_of
    from core.models.load import cached_gguf_dir, load_hf_dir
    from recipes._common import resolve_model

    path = cached_gguf_dir(resolve_model("smollm2"), CACHE_DIR)
    h = structure_of(path, name="smollm2")
    model, _ = load_hf_dir(path)
    m = structure_of(model, name="smollm2")
    assert h.total_params == m.total_params == sum(p.numel() for p in model.parameters())
    assert h.tied_embeddings and m.tied_embeddings and h.lm_head_params == 0
    assert len(h.layers) == 30 and {(l.num_heads, l.num_kv_heads, l.intermediate_size) for l in h.layers} == {(9, 3, 1536)}
    assert [l.params() for l in h.layers] == [l.params() for l in m.layers]
    summary = write_analysis(tmp_path, m, h, model_dir=path)
    assert summary["sparsity"] == 0 and summary["untouched_layers"] == list(range(30))
    text = (tmp_path / "structure_summary.txt").read_text()
    assert "tied to the embedding" in text and "safetensors header" in text and "tokenizer" in text
