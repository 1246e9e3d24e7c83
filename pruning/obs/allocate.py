"""How the compensated pruner spreads its MLP channels over the layers in range: ``uniform``, ``depth``, ``flap``.

    plan = allocate_channels(geo, (3, 27), 9000, "depth")          # {layer: channels removed}, summing to 9000

``uniform``: the same share everywhere; ``depth``: linearly from 0.5x the mean at the first layer in range to 1.5x
at the last (later layers change the residual stream less); ``flap``: FLAP's global ranking of standardised WIFV
scores measured on the dense model (:func:`flap_scores`: one more pass over the calibration samples). Every layer
keeps at least ``min_channels``, a capped layer's share goes to the others, and the total is exact. The searched
allocation (``allocation=search``) is pruning/obs/search.py; it starts from these three.

Imports: torch, ``core.models.llama`` (Geometry), ``pruning`` (PruneError), ``pruning.stats`` (FLAP's scores).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from core.models.llama import Geometry
from pruning import PruneError
from pruning.stats import collect, standardise


def allocate_channels(geo: Geometry, mlp_range: tuple[int, int], total: int, allocation: str, min_channels: int = 1,
                      scores: Optional[dict[int, torch.Tensor]] = None) -> dict[int, int]:
    """``{layer: channels removed}`` summing to exactly ``total`` over the layers of ``mlp_range``, each layer
    keeping at least ``min_channels``: ``uniform``, ``depth`` (weights 0.5 .. 1.5 along the range) or ``flap``
    (the ``total`` lowest standardised ``scores`` over all layers)."""
    layers = list(range(*mlp_range))
    if not layers or total == 0:
        return {}
    cap = {l: max(0, geo.widths[l] - min_channels) for l in layers}
    if total > sum(cap.values()):
        raise PruneError(f"obs: {total} MLP channels cannot be removed while each layer keeps {min_channels}")
    if allocation == "flap":
        if scores is None:
            raise ValueError("flap allocation needs the layers' standardised scores")
        flat = torch.cat([scores[l].double() for l in layers])
        owner = torch.cat([torch.full((scores[l].numel(),), l) for l in layers])
        counts = {l: 0 for l in layers}
        for j in torch.sort(flat, stable=True).indices.tolist():
            l = int(owner[j])
            if counts[l] < cap[l]:
                counts[l] += 1
                total -= 1
                if total == 0:
                    break
        return {l: c for l, c in counts.items() if c}
    n = len(layers)
    weights = [1.0] * n if allocation == "uniform" else [0.5 + (i / (n - 1) if n > 1 else 0.5) for i in range(n)]
    counts = {l: 0 for l in layers}
    left, open_ = total, list(layers)
    while left > 0 and open_:  # largest remainder, capped layers' share redistributed
        w = {l: weights[layers.index(l)] for l in open_}
        share = {l: left * w[l] / sum(w.values()) for l in open_}
        give = {l: min(cap[l] - counts[l], math.floor(share[l])) for l in open_}
        rest = left - sum(give.values())
        for l in sorted(open_, key=lambda l: (-(share[l] - math.floor(share[l])), -l)):
            if rest <= 0:
                break
            if counts[l] + give[l] < cap[l]:
                give[l] += 1
                rest -= 1
        for l, g in give.items():
            counts[l] += g
            left -= g
        open_ = [l for l in open_ if counts[l] < cap[l]]
        if not any(give.values()):
            break
    return {l: c for l, c in counts.items() if c}


def flap_scores(model: nn.Module, calibration: torch.Tensor, mlp_range: tuple[int, int], *, batch_size: int = 0,
                device: Optional[str] = None, offload: bool = False, states: str = "auto"
                ) -> dict[int, torch.Tensor]:
    """Each MLP layer's standardised WIFV scores on the dense model (one streamed pass), for ``allocation=flap``."""
    scores, _ = collect(model, calibration, {"attention": (0, 0), "mlp": mlp_range}, "WIFV",
                        batch_size=batch_size, device=device, offload=offload, states=states)
    return {l: standardise(s) for l, s in scores["mlp"].items()}
