"""One decoder layer at a time: the calibration hidden states carried forward through the model.

Activation-based methods (Wanda, FLAP, ShortGPT, SliceGPT) need each layer's inputs, never the whole model's
activations at once, and never the LM head's logits. :class:`LayerStream` embeds the calibration tokens once,
then hands the methods one layer and the hidden states entering it::

    stream = LayerStream(model, calibration)
    for i, layer in stream:
        with capture_inputs({...}, on_input):    # statistics from hooks while the layer runs
            out = stream.forward()               # the layer over every micro-batch, no grad
        ...                                      # prune / rotate the layer
        stream.advance(out)                      # outputs of the dense layer enter the next one,
        # or stream.advance()                    # the edited layer is run again (sequential methods)

Memory: the model, plus the carried hidden states (``samples x tokens x hidden`` in the model's dtype, two
copies while a layer runs), plus one micro-batch of one layer's activations. ``offload=True`` with a
``device`` keeps the model where it is (CPU) and moves each layer to ``device`` only while it is processed,
so a model larger than the GPU can be pruned; the hidden states live on ``device``.

The inputs of the first layer (hidden states and the keyword arguments the model passes its layers:
position embeddings, causal mask, position ids) are captured by a hook that stops the model right there,
so the stream works with whatever the installed transformers passes its decoder layers.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from core.llama import decoder_layers, layer_types_of
from pruning import PruneError


class _Stop(Exception):
    pass


def check_llama_layout(model: nn.Module, method: str) -> None:
    """PruneError unless ``model`` is a Llama-style decoder (``model.model.layers[i].self_attn/mlp``)."""
    supported = "Llama-style decoders (Llama 2/3, SmolLM2, Mistral-like: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj)"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "embed_tokens"):
        raise PruneError(f"{method}: unsupported architecture {type(model).__name__}; supported: {supported}")
    try:
        types = layer_types_of(model)
    except TypeError as e:
        raise PruneError(f"{method}: unsupported architecture ({e}); supported: {supported}") from None
    if getattr(getattr(model, "config", None), "slicing", None):
        raise PruneError(f"{method}: the model is already sliced by SliceGPT (its hidden width varies per layer); "
                         "prune the dense base model instead")
    if "mamba2" in types:
        raise PruneError(f"{method}: the model has Llamba (mamba2) layers {[i for i, t in enumerate(types) if t == 'mamba2']}; "
                         f"{method} supports {supported} only")
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not all(hasattr(attn, k) for k in ("q_proj", "k_proj", "v_proj", "o_proj")) or \
                not all(hasattr(mlp, k) for k in ("gate_proj", "up_proj", "down_proj")):
            raise PruneError(f"{method}: layer {i} ({type(layer).__name__}) is not Llama-shaped; supported: {supported}")


def check_calibration(calibration: Optional[torch.Tensor], method: str) -> None:
    """The ``[samples, tokens]`` token ids a layer-streamed method needs (one wording for every method)."""
    if calibration is None or calibration.ndim != 2 or calibration.numel() == 0:
        raise PruneError(f"{method} needs calibration tokens [samples, tokens]")


def check_stream_device(model: nn.Module, device: Optional[str], offload: bool) -> None:
    """PruneError, before the model is touched, for a ``pruner.device`` that does not exist here, or that differs
    from the model's own without ``offload`` (the stream would put states and layers on different devices)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PruneError(f"pruner.device={device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PruneError(f"pruner.device={device!r}: this machine has no CUDA device; use pruner.device=null")
    home = next(model.parameters()).device
    if not offload and (dev.type, dev.index or 0) != (home.type, home.index or 0):
        raise PruneError(f"pruner.device={device} differs from the model's device {home}: set pruner.offload=true "
                         "to run one layer at a time there, or leave pruner.device=null")


def resolve_autocast(name: Optional[str], device: torch.device | str) -> Optional[torch.dtype]:
    """The dtype of a method's ``autocast`` option on ``device``: ``None`` (the model's own dtype), ``bfloat16`` /
    ``float16``, or ``auto``: bfloat16 where the device multiplies it natively (CUDA with bf16, x86 CPUs with
    AVX512-BF16 or AMX: about 2.5x a float32 layer forward on an AVX512-BF16 core), else the model's own dtype
    (an emulated bfloat16 product is slower than float32)."""
    if name is None:
        return None
    if name != "auto":
        return getattr(torch, name)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_multiplies_bf16() else None
    return None


@functools.lru_cache(maxsize=1)
def _cpu_multiplies_bf16() -> bool:
    """Whether this x86 CPU has AVX512-BF16 or AMX (read once per process from /proc/cpuinfo)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


class LayerStream:
    """Iterate over decoder layers with the calibration hidden states that enter each one.

    ``calibration``: ``[samples, tokens]`` token ids. ``batch_size``: samples per layer forward (0 = all).
    ``autocast``: a lower-precision dtype (``torch.bfloat16``) the layers' matrix products run in under
    ``torch.autocast`` while the carried hidden states (the residual stream) stay in the model's dtype.
    """

    def __init__(self, model: nn.Module, calibration: torch.Tensor, *, batch_size: int = 0,
                 device: Optional[str | torch.device] = None, offload: bool = False, progress: bool = False,
                 autocast: Optional[torch.dtype] = None):
        if calibration is None or calibration.ndim != 2 or calibration.shape[0] == 0:
            raise PruneError("this method needs calibration tokens [samples, tokens]")
        self.model = model
        self.layers = decoder_layers(model)
        self.home = next(model.parameters()).device  # where the model's weights live
        self.device = torch.device(device) if device is not None else self.home
        self.offload = bool(offload) and self.device != self.home
        self.dtype = next(model.parameters()).dtype
        self.autocast = autocast if autocast is not None and autocast != self.dtype else None
        self.progress = progress
        step = batch_size if batch_size and batch_size < calibration.shape[0] else calibration.shape[0]
        self.chunks = [calibration[j:j + step] for j in range(0, calibration.shape[0], step)]
        self.tokens = int(calibration.numel())
        self.index = -1
        self.seconds: dict[str, float] = {"embed": 0.0, "layers": 0.0}
        t0 = time.perf_counter()
        self.hidden, self.kwargs = self._embed()
        self.seconds["embed"] = time.perf_counter() - t0

    # -- the first layer's inputs ------------------------------------------------------------------------------
    def _embed(self) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        inner = self.model.model
        first = self.layers[0]
        moved = [m for m in (inner.embed_tokens, getattr(inner, "rotary_emb", None), first) if m is not None]
        if self.offload:
            for m in moved:
                m.to(self.device)
        hidden, kwargs = [], []

        def grab(_m: nn.Module, args: tuple, kw: dict) -> None:
            x = args[0] if args else kw.pop("hidden_states")
            hidden.append(x.detach())
            kw = {k: v for k, v in kw.items() if k != "hidden_states"}
            kw["use_cache"] = False
            kw.pop("past_key_values", None)
            kw.pop("cache", None)  # transformers >= 5.24
            kwargs.append(kw)
            raise _Stop

        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for chunk in self.chunks:
                    try:
                        inner(input_ids=chunk.to(self.device), use_cache=False)
                    except _Stop:
                        pass
        finally:
            handle.remove()
            if self.offload:
                for m in moved:
                    m.to(self.home)
        if len(hidden) != len(self.chunks):
            raise RuntimeError("the model never reached its first decoder layer")
        return hidden, kwargs

    # -- iteration -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[tuple[int, nn.Module]]:
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self.layers)), desc="layers", disable=not self.progress):
            self.index = i
            layer = self.layers[i]
            if self.offload:
                layer.to(self.device)
            try:
                yield i, layer
            finally:
                if self.offload:
                    self.layers[i].to(self.home)  # (the method may have replaced the module)

    @property
    def layer(self) -> nn.Module:
        return self.layers[self.index]

    def forward(self, layer: Optional[nn.Module] = None,
                inputs: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
        """The current layer (or ``layer``) over every micro-batch of ``inputs`` (default: the carried states)."""
        layer = self.layer if layer is None else layer
        inputs = self.hidden if inputs is None else inputs
        t0 = time.perf_counter()
        out = []
        with torch.no_grad(), self._autocast():
            for x, kw in zip(inputs, self.kwargs):
                y = layer(x, **kw)
                out.append((y[0] if isinstance(y, tuple) else y).detach())
        self.seconds["layers"] += time.perf_counter() - t0
        return out

    def run(self, fn: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]) -> list[torch.Tensor]:
        """``fn(hidden, layer_kwargs)`` over every micro-batch (for methods that run a layer piece by piece)."""
        t0 = time.perf_counter()
        with torch.no_grad(), self._autocast():
            out = [fn(x, kw) for x, kw in zip(self.hidden, self.kwargs)]
        self.seconds["layers"] += time.perf_counter() - t0
        return out

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def advance(self, outputs: Optional[list[torch.Tensor]] = None) -> None:
        """Move to the next layer's inputs: ``outputs`` if given (e.g. the dense layer's), else the current
        (edited) layer is run again over the carried states."""
        self.hidden = self.forward() if outputs is None else outputs

    @property
    def activation_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)
