"""Per-channel statistics of the inputs of ``o_proj`` / ``down_proj`` over calibration tokens, and FLAP's scores.

    scores, means = collect(model, calibration, {"attention": (3, 27), "mlp": (3, 27)}, "WIFV")

:class:`Moments` accumulates the count, mean and sum of squared deviations of a projection's inputs in float64
(Chan et al.'s pairwise update over blocks of tokens: no sum of squares of raw values is ever formed);
:func:`channel_scores` turns them into FLAP's fluctuation scores (WIFV, WIFN, IFV); :func:`collect` runs one
streamed pass over the dense model and returns the scores and mean inputs per kind and layer; :func:`standardise`
puts one layer's scores on a common scale. FLAP (pruning/flap.py) prunes with them; the compensated pruner's
``flap`` allocation (pruning/obs/allocate.py) and its searched allocation (pruning/obs/search.py) rank MLP
channels by them.

Imports: ``pruning.calibration`` and ``pruning.streaming`` inside :func:`collect` only. Both import torch, and
this module is imported by pruning/flap.py, whose options bind at config validation without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch
    from torch import nn

KINDS = ("attention", "mlp")
_BLOCK_BYTES = 4 * 2**20  # float64 block of tokens in the moment accumulator (its only temporary)


class Moments:
    """Per-channel count, mean and sum of squared deviations of ``[..., channels]`` inputs, in float64.

    Blocks of tokens are merged with Chan et al.'s pairwise update, so no sum of squares of raw values is
    ever formed (no cancellation) and the float64 copy is one block at a time.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        rows = max(1, _BLOCK_BYTES // (8 * x.shape[1]))
        for s in range(0, x.shape[0], rows):
            b = x[s:s + rows].double()
            nb, mb = b.shape[0], b.mean(0)
            m2b = b.sub_(mb).pow_(2).sum(0)
            if self.n == 0:
                self.n, self.mean, self.m2 = nb, mb, m2b
                continue
            n = self.n + nb
            d = mb - self.mean
            self.mean = self.mean + d * (nb / n)
            self.m2 = self.m2 + m2b + d.pow(2) * (self.n * nb / n)
            self.n = n

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance over tokens (``N - 1``, as the paper's fluctuation)."""
        return self.m2 / max(self.n - 1, 1)

    @property
    def mean_square(self) -> torch.Tensor:
        return self.m2 / self.n + self.mean.pow(2)


def channel_scores(moments: Moments, weight: torch.Tensor, metric: str) -> torch.Tensor:
    """Score of each input channel of a projection ``weight`` ``[out, in]`` (float64 ``[in]``)."""
    w = weight.detach().double()
    if metric == "IFV":
        return moments.variance
    if metric == "WIFV":
        return moments.variance * w.pow(2).sum(0)
    return w.abs().mean(0) * moments.mean_square.sqrt()  # WIFN


def collect(model: nn.Module, calibration: torch.Tensor, ranges: dict[str, tuple[int, int]], metric: str, *,
            batch_size: int = 0, device: Optional[str] = None, offload: bool = False, states: str = "auto",
            seconds: Optional[dict[str, float]] = None
            ) -> tuple[dict[str, dict[int, torch.Tensor]], dict[str, dict[int, torch.Tensor]]]:
    """One streamed pass over the dense model: per kind and layer in range, the channel scores (attention scores
    squared, as the reference) and the mean input of ``o_proj`` / ``down_proj`` (float64, on the CPU)."""
    # local: imports torch, and config validation imports this module (pruning/flap.py)
    from pruning.calibration import capture_inputs
    from pruning.streaming import LayerStream

    scores: dict[str, dict[int, torch.Tensor]] = {k: {} for k in KINDS}
    means: dict[str, dict[int, torch.Tensor]] = {k: {} for k in KINDS}
    last = max((e for s, e in ranges.values() if e > s), default=0)
    if last == 0:
        return scores, means
    stream = LayerStream(model, calibration, batch_size=batch_size, device=device, offload=offload, states=states)
    for i, layer in stream:
        if i >= last:
            break  # nothing in range beyond: the rest of the model is never run
        watch = {}
        if ranges["attention"][0] <= i < ranges["attention"][1]:
            watch["attention"] = layer.self_attn.o_proj
        if ranges["mlp"][0] <= i < ranges["mlp"][1]:
            watch["mlp"] = layer.mlp.down_proj
        moments = {k: Moments() for k in watch}
        with capture_inputs(watch, lambda k, x: moments[k].add(x)):
            stream.advance()  # the dense outputs, in place: every layer is scored on the unpruned model's states
        for k, m in moments.items():
            s = channel_scores(m, watch[k].weight, metric)
            scores[k][i] = (s.pow(2) if k == "attention" else s).cpu()
            means[k][i] = m.mean.cpu()
    stream.close()
    if seconds is not None:
        seconds.update({"embed_s": stream.seconds["embed"], "layers_s": stream.seconds["layers"]})
    return scores, means


def standardise(s: torch.Tensor) -> torch.Tensor:
    """``(s - mean) / std`` over one layer's channels (all zeros when they do not vary)."""
    std = s.std() if s.numel() > 1 else s.new_zeros(())
    return (s - s.mean()) / std if std > 0 else s.new_zeros(s.shape)
