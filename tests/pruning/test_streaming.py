"""The layer stream reproduces the model's own forward, one layer at a time."""

import pytest
import torch

from pruning import PruneError
from pruning.calibration import capture_inputs
from pruning.streaming import LayerStream, check_llama_layout


def test_stream_reproduces_the_forward(tiny, calib):
    tiny, _ = tiny
    with torch.no_grad():
        ref = tiny(calib).logits
    stream = LayerStream(tiny, calib, batch_size=3)  # micro-batches of 3 + 1
    assert len(stream.chunks) == 2
    seen = []
    for i, _layer in stream:
        seen.append(i)
        stream.advance()
    assert seen == list(range(len(tiny.model.layers)))
    hidden = torch.cat(stream.hidden)
    logits = tiny.lm_head(tiny.model.norm(hidden))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_autocast_runs_the_products_in_bfloat16_and_carries_the_residual_in_float32(tiny, calib):
    tiny, _ = tiny
    ref, low = LayerStream(tiny, calib), LayerStream(tiny, calib, autocast=torch.bfloat16)
    seen = []
    with capture_inputs({"down": tiny.model.layers[0].mlp.down_proj}, lambda _k, x: seen.append(x.dtype)):
        low_out = low.forward(tiny.model.layers[0])
    out = ref.forward(tiny.model.layers[0])
    assert seen == [torch.bfloat16]  # the products ran in bfloat16 ...
    assert all(o.dtype == torch.float32 for o in low_out)  # ... the residual stream did not
    err = max(float((a - b).norm() / b.norm()) for a, b in zip(low_out, out))
    assert 0 < err < 2e-2
    assert LayerStream(tiny, calib, autocast=torch.float32).autocast is None  # the model's own dtype: no autocast


def test_hooks_see_each_layers_inputs(tiny, calib):
    tiny, _ = tiny
    stream = LayerStream(tiny, calib)
    counts = []
    for _i, layer in stream:
        got = []
        with capture_inputs({"q": layer.self_attn.q_proj, "down": layer.mlp.down_proj},
                            lambda n, x: got.append((n, tuple(x.shape)))):
            out = stream.forward()
        stream.advance(out)
        counts.append(got)
    assert counts[0] == [("q", (4, 24, 64)), ("down", (4, 24, 128))]


def test_unsupported_architecture_is_named(tiny):
    tiny, _ = tiny
    check_llama_layout(tiny, "wanda")

    class Odd(torch.nn.Module):
        pass

    with pytest.raises(PruneError, match="unsupported architecture Odd.*supported: Llama"):
        check_llama_layout(Odd(), "wanda")


def test_resolve_autocast(monkeypatch):
    from pruning import streaming

    assert streaming.resolve_autocast(None, "cpu") is None
    assert streaming.resolve_autocast("float16", "cpu") is torch.float16
    native = open("/proc/cpuinfo").read()
    expected = torch.bfloat16 if ("avx512_bf16" in native or "amx_bf16" in native) else None
    assert streaming.resolve_autocast("auto", "cpu") is expected
