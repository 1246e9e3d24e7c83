"""Calibration passes shared by pruning methods: gradients streamed per weight, inputs captured per module.

- :func:`gradient_passes`: forward+backward over calibration tokens, each watched weight's gradient handed to a
  callback the moment it is accumulated and freed at once, so peak memory is weights + activations + one
  gradient. Activations are trimmed without changing any gradient: the LM-head loss runs over chunks of tokens
  (:func:`lm_loss_backward`) and SwiGLU MLPs recompute ``silu(g) * u`` in backward (:class:`_SwiGLUDown`).
- :func:`capture_inputs`: forward hooks that hand each watched module's input to a callback (activation
  statistics for Wanda-style and compensation methods), removed on exit.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.activations import SiLUActivation

from core.run import plan


class _SwiGLUDown(torch.autograd.Function):
    """``down(silu(g) * u)`` that saves only ``g`` and ``u`` for backward and recomputes the product.

    Autograd would keep silu(g), silu(g) * u as well: two more ``[tokens, intermediate]`` tensors per layer,
    a quarter of all calibration activations of a Llama. Gradients are those of the stock module.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u, w)
        return torch.nn.functional.linear(torch.nn.functional.silu(g) * u, w)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g, u, w = ctx.saved_tensors
        s = torch.sigmoid(g)
        a = g * s
        dp = dy @ w
        dw = None
        if ctx.needs_input_grad[2]:
            dw = dy.reshape(-1, dy.shape[-1]).T @ (a * u).reshape(-1, u.shape[-1])
        du = dp * a if ctx.needs_input_grad[1] else None
        dg = dp * u * s * (1 + g * (1 - s)) if ctx.needs_input_grad[0] else None
        return dg, du, dw


def _lean_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _SwiGLUDown.apply(mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj.weight)


def lean_mlps(model: nn.Module) -> list[nn.Module]:
    """Stock SwiGLU MLPs (SiLU, no biases) whose forward can be swapped for the lean one."""
    out = []
    for layer in model.model.layers:
        m = getattr(layer, "mlp", None)
        if (m is not None and all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj"))
                and "forward" not in vars(m) and not hasattr(m, "_hf_hook")  # accelerate's hooks wrap forward
                and isinstance(getattr(m, "act_fn", None), (nn.SiLU, SiLUActivation))
                and all(getattr(m, k).bias is None for k in ("gate_proj", "up_proj", "down_proj"))):
            out.append(m)
    return out


LOGITS_CHUNK_BYTES = plan.LOGITS_CHUNK_BYTES  # fp32 logits per LM-head chunk (their softmax and gradient are as large)


def lm_loss_backward(model: nn.Module, ids: torch.Tensor, scale: float = 1.0) -> None:
    """Backward of ``scale * model(ids, labels=ids).loss`` without holding the whole batch's logits.

    The decoder runs once; the LM head and the cross-entropy run over chunks of tokens, each chunk's
    backward accumulating into the gradient of the final hidden states, which is then pushed through the
    decoder once. Same gradients as the plain loss (next-token mean over all positions), but the
    ``[tokens, vocab]`` fp32 logits and their gradient never exist all at once (10 x 64 tokens of a
    49k-token vocabulary: 126 MB each; a chunk holds at most :data:`LOGITS_CHUNK_BYTES`).
    """
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    if not hidden.requires_grad:
        return
    h = hidden.detach().reshape(-1, hidden.shape[-1]).requires_grad_(True)
    targets = ids[:, 1:].reshape(-1)
    n = targets.numel()
    step = max(1, LOGITS_CHUNK_BYTES // (4 * model.config.vocab_size))
    for s in range(0, n, step):
        logits = model.lm_head(h[s:s + step]).float()  # (device_map: the head may sit on another device)
        (F.cross_entropy(logits, targets[s:s + step].to(logits.device), reduction="sum") * (scale / n)).backward()
    hidden.reshape(-1, hidden.shape[-1]).backward(h.grad)


def gradient_passes(model: nn.Module, batch: torch.Tensor, weights: list[nn.Parameter],
                    on_grad: Callable[[int, torch.Tensor], None], per_sample: bool, micro: int,
                    progress: bool) -> None:
    """Run forward+backward; call ``on_grad(i, grad)`` once per weight per pass (per sample if asked).

    Each weight's gradient is handed over by a post-accumulate hook and freed at once.
    """
    device = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in weights:
        p.requires_grad_(True)
    live = {"on": True}
    handles = []
    for i, p in enumerate(weights):
        def hook(param: torch.Tensor, i: int = i) -> None:
            if live["on"]:
                on_grad(i, param.grad)
                param.grad = None
        handles.append(p.register_post_accumulate_grad_hook(hook))
    lean = lean_mlps(model)
    for m in lean:  # instance attribute shadows the class forward; deleted in `finally`
        m.forward = types.MethodType(_lean_mlp_forward, m)
    try:
        if per_sample:
            chunks = [batch[j:j + 1] for j in range(batch.shape[0])]
        else:
            step = micro if micro and micro < batch.shape[0] else batch.shape[0]
            chunks = [batch[j:j + step] for j in range(0, batch.shape[0], step)]
        for k, chunk in enumerate(tqdm(chunks, desc="calibration fwd+bwd", disable=not progress)):
            # Whole-batch scores (first-order terms) need the summed gradient: let micro-batches accumulate,
            # and hand the gradient over on the last one only.
            live["on"] = per_sample or k == len(chunks) - 1
            scale = 1.0 if per_sample else chunk.shape[0] / batch.shape[0]
            with torch.autocast(device_type=device.type, enabled=False):
                lm_loss_backward(model, chunk.to(device), scale)
    finally:
        for m in lean:
            del m.forward
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
            p.grad = None


@contextmanager
def capture_inputs(modules: Mapping[str, nn.Module], on_input: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, every forward of ``modules[name]`` calls ``on_input(name, x)`` with its first input
    (``[batch, tokens, features]``, detached). Hooks are removed on exit, also after an error."""
    handles = []
    for name, module in modules.items():
        def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
            on_input(name, args[0].detach())
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
