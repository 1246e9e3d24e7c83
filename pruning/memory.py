"""What a layer-streamed pruner holds, without torch: the terms of :class:`pruning.streaming.LayerStream` that every
streamed method's ``footprint`` starts from (the byte helpers are ``core.run.plan``'s).

    p = stream(config, tokens=131072, seq_len=512, batch_size=8, dtype="bfloat16", model_device="cpu",
               device="cuda", offload=True)          # weights placed, carried hidden states, one layer's forward
    p.add(**{"captured down_proj inputs": ...})      # the method's own terms, where its layers run
    footprint = p.footprint(layer_forwards=..., tokens=...)

The formulas follow the code as it is: LayerStream keeps ONE copy of every calibration sample's hidden states
(each micro-batch's outputs are written over its inputs; ``copies`` = 2 for a method that also carries the dense
model's states: ``obs`` with ``target=dense``) where ``states`` puts them (``pruning.options.choose_states``, the
same decision the run takes: ``auto`` = the device if they fit half its free memory, else the host, pinned on
CUDA, else disk), and runs one micro-batch (``batch_size`` samples, 0 = all) of one layer at a time, that
micro-batch (its inputs and outputs) on the device only while the layer runs. With ``states=disk`` the states take
scratch space instead (:func:`stream_disk_bytes`) and only the micro-batches in flight are in memory.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from core.run.plan import Placement, hidden_bytes, layer_forward_bytes, placement
from pruning.options import choose_states

STREAM_COPIES = 1  # the carried hidden states (a layer's outputs replace its inputs, micro-batch by micro-batch)


def micro_batch(tokens: int, seq_len: int, batch_size: int) -> int:
    """Samples per layer forward: ``batch_size``, or all of them for 0."""
    samples = max(1, math.ceil(int(tokens) / max(1, int(seq_len))))
    return samples if not batch_size or batch_size > samples else int(batch_size)


def stream_states(cfg: Mapping[str, Any], *, tokens: int, dtype: str, device: str, states: str = "auto",
                  copies: int = STREAM_COPIES, device_free: Optional[int] = None,
                  host_free: Optional[int] = None) -> str:
    """Where a stream's hidden states go (``device`` | ``host`` | ``disk``), decided as ``LayerStream`` decides
    (``pruning.options.choose_states``; a free size not given counts as enough, so ``auto`` plans for the device)."""
    from core.run.plan import accelerator

    return choose_states(states, copies * hidden_bytes(tokens, cfg, dtype), accelerator(device), device_free,
                         host_free)


def stream(cfg: Mapping[str, Any], *, tokens: int, seq_len: int, batch_size: int, dtype: str, model_device: str,
           device: Optional[str] = None, offload: bool = False, copies: int = STREAM_COPIES,
           states: str = "auto", attention: str = "sdpa", device_free: Optional[int] = None,
           host_free: Optional[int] = None) -> Placement:
    """The weights (``core.run.plan.placement``), ``copies`` x the carried hidden states of ``tokens`` tokens where
    ``states`` puts them (:func:`stream_states`), and one layer's forward on a micro-batch with its inputs and
    outputs (``copies`` of each) where the layers run."""
    p = placement(cfg, dtype, model_device, device, offload)
    # LayerStream decides when it starts, the model loaded: what the weights took is no longer free
    if device_free is not None and p.on_device:
        device_free -= p.work.get("weights", 0)
    if host_free is not None:
        host_free -= p.host.get("weights", 0) + (0 if p.on_device else p.work.get("weights", 0))
    states_bytes = copies * hidden_bytes(tokens, cfg, dtype)
    b = micro_batch(tokens, seq_len, batch_size)
    in_flight = 2 * copies * hidden_bytes(b * seq_len, cfg, dtype)  # a micro-batch's inputs and outputs
    where = stream_states(cfg, tokens=tokens, dtype=dtype, device=p.work_device, states=states, copies=copies,
                          device_free=device_free, host_free=host_free)
    if where == "device" or (where == "host" and not p.on_device):
        p.add(**{f"hidden states (x{copies})": states_bytes})
    elif where == "host":
        p.add_host(**{f"hidden states (x{copies}), pinned on the host": states_bytes})
        p.add(**{"micro-batches in flight (inputs, outputs)": in_flight})
    else:  # disk: a micro-batch read back (host) and its copy where the layers run
        p.add(**{"micro-batches in flight (inputs, outputs)": in_flight})
        if p.on_device:
            p.add_host(**{"a micro-batch read from disk": hidden_bytes(b * seq_len, cfg, dtype)})
    p.add(**{"one layer's forward (micro-batch)": layer_forward_bytes(b, seq_len, cfg, dtype, attention=attention)})
    return p


def stream_disk_bytes(cfg: Mapping[str, Any], tokens: int, dtype: str, states: str, copies: int = STREAM_COPIES, *,
                      device: str = "cpu", device_free: Optional[int] = None, host_free: Optional[int] = None) -> int:
    """Scratch space of the hidden states when they go to disk (``states=disk``, or ``auto`` with neither the
    device nor the host able to hold them)."""
    where = stream_states(cfg, tokens=tokens, dtype=dtype, device=device, states=states, copies=copies,
                          device_free=device_free, host_free=host_free)
    return copies * hidden_bytes(tokens, cfg, dtype) if where == "disk" else 0


def layers_up_to(last: int) -> int:
    """Decoder-layer forwards of one pass that stops after layer ``last`` (-1: none)."""
    return max(0, int(last) + 1)


def largest_linear(geo: Any) -> int:
    """Entries of the largest projection of a :class:`core.models.llama.Geometry` (gate/up/down or q/o)."""
    return max(geo.hidden * max(geo.widths or (0,)), geo.hidden * max(geo.heads or (0,)) * geo.head_dim)


def layer_weight_params(geo: Any, layer: int) -> int:
    """Attention + MLP parameters of one layer (what a structured surgery rebuilds)."""
    return geo.group_params(layer) * geo.kv_heads[layer] + geo.channel_params() * geo.widths[layer]


def weight_level_summary(plan: Any, geo: Any, rounding: str) -> tuple[list[str], Optional[list[dict]]]:
    """What a magnitude / Wanda prune removes (``plan``: a ``pruning.sparsity.Plan``), and the per-layer widths
    after a structured one."""
    from core.run.plan import span
    from pruning.sparsity import plan_units

    if plan.pattern.kind != "structured":
        lines = []
        for part, names, r in (("attention", "q k v o", plan.attention_layers), ("mlp", "gate up down",
                                                                                 plan.mlp_layers)):
            targets = [t for t in plan.targets if t in names.split()]
            if targets and r[1] > r[0]:
                lines.append(f"{part}: {plan.sparsity(targets[0]):.4g} of the weights of {', '.join(targets)} zeroed "
                             f"({plan.pattern}) in layers {span(r)}; shapes stay dense")
        return lines or ["nothing (every ratio is 0)"], None
    heads = plan_units("KV groups", "pruner.attention_ratio", plan.attention_ratio,
                       {l: geo.kv_heads[l] for l in range(*plan.attention_layers)}, rounding) \
        if plan.attention_ratio > 0 else {}
    chans = plan_units("MLP channels", "pruner.mlp_ratio", plan.mlp_ratio,
                       {l: geo.widths[l] for l in range(*plan.mlp_layers)}, rounding) if plan.mlp_ratio > 0 else {}
    lines = [f"{sum(heads.values())} KV groups in layers {span(plan.attention_layers)}, {sum(chans.values()):,} MLP "
             f"channels in layers {span(plan.mlp_layers)} (structured, {rounding})"]
    widths = [{"layer": l, "kv_heads": [geo.kv_heads[l], geo.kv_heads[l] - heads.get(l, 0)],
               "intermediate_size": [geo.widths[l], geo.widths[l] - chans.get(l, 0)]} for l in range(geo.depth)]
    return lines, widths
