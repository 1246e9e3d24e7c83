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
