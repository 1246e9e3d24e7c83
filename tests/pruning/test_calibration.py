"""Calibration helpers shared by pruning methods: input capture hooks."""

from __future__ import annotations

import torch

from pruning.calibration import capture_inputs


def test_capture_inputs_hands_each_modules_input_and_cleans_up(tiny, calib):
    model, _ = tiny
    layers = model.model.layers
    watched = {"gate.1": layers[1].mlp.gate_proj, "q.2": layers[2].self_attn.q_proj}
    seen: dict[str, list[torch.Tensor]] = {}
    normed: list[torch.Tensor] = []
    h = layers[1].post_attention_layernorm.register_forward_hook(lambda m, a, out: normed.append(out.detach()))
    with torch.no_grad(), capture_inputs(watched, lambda name, x: seen.setdefault(name, []).append(x)):
        model(calib)
    h.remove()
    assert set(seen) == {"gate.1", "q.2"} and len(seen["gate.1"]) == 1
    assert seen["gate.1"][0].shape == (*calib.shape, 64)  # [batch, tokens, hidden]
    assert torch.equal(seen["gate.1"][0], normed[0])  # the MLP's input is the normed residual stream
    assert not seen["q.2"][0].requires_grad
    with torch.no_grad():
        model(calib)  # hooks are gone
    assert len(seen["gate.1"]) == 1
    assert not layers[1].mlp.gate_proj._forward_pre_hooks and not layers[2].self_attn.q_proj._forward_pre_hooks
