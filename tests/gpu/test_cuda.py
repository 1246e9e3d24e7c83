"""Real CUDA tests (marker ``gpu``): skipped where torch sees no CUDA device, so CI never depends on them.

    python -m pytest tests/gpu -m gpu -q          (tests/gpu/run.sh runs them after its measured runs)
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def tiny_cuda():
    from core.models.load import build_tiny

    model, tok = build_tiny(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2, seed=0)
    return model, tok


def _calib(rows: int = 8, tokens: int = 32):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (rows, tokens), generator=g)


def test_a_tiny_prune_on_cuda_runs_and_stays_on_the_device(tmp_path):
    from conftest import run_task

    _, m = run_task(["model=tiny", "model.device=cuda", "logger=none", "eval=none", "layers=all", "pruner=wanda",
                     "ratio=0.25", "data.num_samples=8", "data.seq_len=32"], tmp_path)
    assert m["status"] == "completed", m.get("error")
    assert m["params"]["pruned"] < m["params"]["base"]
    assert torch.cuda.max_memory_allocated() > 0


@pytest.mark.parametrize("states", ["device", "host", "disk"])
def test_layer_stream_with_offload_to_cuda_matches_the_cpu(tiny_cuda, tmp_path, states):
    """The model on the CPU, each layer visiting cuda: the carried hidden states equal a CPU-only stream's, and
    the model is back on the CPU afterwards."""
    from pruning.streaming import LayerStream

    model, _ = tiny_cuda
    calib = _calib()
    ref = LayerStream(model, calib, batch_size=3)
    for _ in ref:
        ref.advance()
    want = torch.cat([h.float().cpu() for h in ref.hidden])
    ref.close()
    stream = LayerStream(model, calib, batch_size=3, device="cuda", offload=True, states=states,
                         states_dir=str(tmp_path))
    assert stream.offload and stream.placement == states
    for _ in stream:
        stream.advance()
    got = torch.cat([stream.hidden.load(j).float().cpu() for j in range(len(stream.hidden))])
    stream.close()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_obs_with_offload_prunes_on_cuda_like_on_the_cpu(tiny_cuda):
    import copy

    from pruning.obs.pruner import StructuredOBS

    model, _ = tiny_cuda
    calib = _calib(16, 32)
    cpu_model, gpu_model = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(ratio=0.25, ratio_target="groups", mlp_layers={"start": 0, "end": None},
              attention_layers={"start": 0, "end": None}, tokens=None, autocast=None, progress=False)
    StructuredOBS(**kw)(cpu_model, calib)
    StructuredOBS(**kw, offload=True, device="cuda")(gpu_model, calib)
    widths = lambda m: [l.mlp.gate_proj.out_features for l in m.model.layers]  # noqa: E731
    assert widths(cpu_model) == widths(gpu_model)
    with torch.no_grad():
        a, b = cpu_model(calib[:2]).logits, gpu_model(calib[:2]).logits
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
