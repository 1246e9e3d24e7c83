"""One decoder layer at a time: the calibration hidden states carried forward through the model.

Activation-based methods (Wanda, FLAP, ShortGPT, SliceGPT) need each layer's inputs, never the whole model's
activations at once, and never the LM head's logits. :class:`LayerStream` embeds the calibration tokens once,
then hands the methods one layer and the hidden states entering it::

    stream = LayerStream(model, calibration)
    for i, layer in stream:
        with capture_inputs({...}, on_input):    # statistics from hooks while the layer runs
            stream.advance()                     # the dense layer over every micro-batch (no grad): its
        ...                                      # outputs replace its inputs; then prune / rotate the layer
    # sequential methods: statistics from stream.run(lambda x, kw: layer(x, **kw) and None), prune, then
    # stream.advance() runs the edited layer

Memory: the model, the carried hidden states (``samples x tokens x hidden`` in the model's dtype, ONE copy:
:meth:`LayerStream.advance` and :meth:`LayerStream.update` write each micro-batch's outputs over its inputs), and
one micro-batch of one layer's activations. ``offload=True`` with a ``device`` keeps the model where it is (CPU)
and moves each layer to ``device`` only while it is processed, so a model larger than the GPU can be pruned.

Where the hidden states live (``states``, :class:`States`): ``device`` (where the layers run), ``host`` (CPU
memory, pinned when the device is CUDA; the same as ``device`` on a CPU run) or ``disk`` (one file per micro-batch,
written and read through ``numpy.memmap``, under a temporary directory in ``$PRUNELAB_STATES_DIR`` or ``$TMPDIR``,
deleted with the stream). ``auto`` (the default) takes the first that fits
:data:`pruning.options.STATES_SHARE` of the free memory there: the device's (CUDA: ``torch.cuda.mem_get_info``),
else the host's (``MemAvailable``), else disk.
Whatever the placement, a micro-batch is on the device only while a layer runs on it. :meth:`LayerStream.forward`
(outputs kept next to the inputs, a second copy) is there for methods that compare a layer's inputs with its
outputs; the others update in place.

The inputs of the first layer (hidden states and the keyword arguments the model passes its layers:
position embeddings, causal mask, position ids) are captured by a hook that stops the model right there,
so the stream works with whatever the installed transformers passes its decoder layers.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import re
import shutil
import tempfile
import time
import weakref
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from core.models.llama import decoder_layers, layer_types_of
from pruning import PruneError
from pruning.options import STATES, choose_states


class _Stop(Exception):
    pass


def layer_pieces(layer: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A Llama decoder layer run piece by piece, the same operations as ``LlamaDecoderLayer.forward``:
    ``(h, m)`` with ``h = x + attn(norm1(x))`` and ``m = mlp(norm2(h))``; the layer's output is ``h + m``."""
    a = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
    h = x + (a[0] if isinstance(a, tuple) else a)
    return h, layer.mlp(layer.post_attention_layernorm(h))


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


STATES_DIR_ENV = "PRUNELAB_STATES_DIR"  # where states=disk writes (default: $TMPDIR)


def host_available() -> Optional[int]:
    """Bytes of host memory available to a new allocation (``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_free(device: torch.device) -> Optional[int]:
    """Free bytes on a CUDA device (None for any other device)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def resolve_states(states: str, need: int, device: torch.device | str) -> str:
    """Where ``need`` bytes of hidden states go on ``device`` (:func:`pruning.options.choose_states` with this
    machine's free memory: ``auto`` takes the device if they fit :data:`pruning.options.STATES_SHARE` of its free
    memory, else the host, else disk)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    return choose_states(states, need, cuda, device_free(device) if cuda else None, host_available())


class Scratch:
    """A temporary directory for ``states=disk``, removed when closed or when the last user lets it go."""

    def __init__(self, parent: Optional[str] = None):
        parent = parent or os.environ.get(STATES_DIR_ENV) or None
        if parent:
            os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix="prunelab-states-", dir=parent)
        self._files = itertools.count()
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True)

    def file(self) -> str:
        return os.path.join(self.path, f"{next(self._files)}.bin")

    def close(self) -> None:
        self._finalizer()


class States:
    """The hidden states of each calibration micro-batch, kept where ``placement`` says (module docstring).

    ``load(j)`` gives micro-batch ``j`` on ``device`` (the tensor itself for ``device``; a copy otherwise),
    ``put(j, x)`` stores ``x`` as micro-batch ``j`` (replacing what was there), ``append(x)`` adds one. Iterating
    (and indexing) loads, one micro-batch at a time, so ``zip(states, outputs)`` holds two micro-batches on the
    device, never the whole set."""

    def __init__(self, placement: str, device: torch.device, scratch: Optional[Scratch] = None):
        if placement not in STATES[1:]:
            raise ValueError(f"placement {placement!r} is not one of {', '.join(STATES[1:])}")
        self.placement, self.device = placement, torch.device(device)
        self.scratch = scratch if placement == "disk" else None
        if placement == "disk" and scratch is None:
            self.scratch = Scratch()
        # host copies only when the device is not the host (a CPU run's host states are its device states)
        self._host_copy = placement == "host" and self.device.type != "cpu"
        self._pin = self._host_copy and self.device.type == "cuda" and torch.cuda.is_available()
        self.slots: list[Any] = []

    def __len__(self) -> int:
        return len(self.slots)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for j in range(len(self.slots)):
            yield self.load(j)

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.load(j if j >= 0 else len(self.slots) + j)

    def load(self, j: int) -> torch.Tensor:
        slot = self.slots[j]
        if self.placement == "disk":
            path, shape, dtype = slot
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            x = torch.from_numpy(np.array(mm)).view(dtype).reshape(shape)  # a copy: the map is closed at once
            del mm
            return x.to(self.device)
        if self._host_copy:
            return slot.to(self.device, non_blocking=self._pin)
        return slot

    def put(self, j: int, x: torch.Tensor) -> None:
        x = x.detach()
        if j == len(self.slots):
            self.slots.append(None)
        old = self.slots[j]
        if self.placement == "disk":
            path = old[0] if old is not None else self.scratch.file()
            data = x.contiguous().cpu().view(torch.uint8).reshape(-1).numpy()
            mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=data.shape)
            mm[:] = data
            mm.flush()
            del mm
            self.slots[j] = (path, tuple(x.shape), x.dtype)
        elif self._host_copy:
            if old is not None and old.shape == x.shape and old.dtype == x.dtype:
                old.copy_(x)  # into the same (pinned) buffer: no new allocation per layer
            else:
                buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=self._pin)
                buf.copy_(x)
                self.slots[j] = buf
        else:
            self.slots[j] = x

    def append(self, x: torch.Tensor) -> None:
        self.put(len(self.slots), x)

    @property
    def nbytes(self) -> int:
        """Bytes stored (in memory or on disk)."""
        total = 0
        for slot in self.slots:
            if slot is None:
                continue
            if self.placement == "disk":
                total += math.prod(slot[1]) * torch.empty(0, dtype=slot[2]).element_size()
            else:
                total += slot.numel() * slot.element_size()
        return total

    def clear(self) -> None:
        """Drop every micro-batch (their files too)."""
        if self.placement == "disk":
            for slot in self.slots:
                if slot is not None:
                    with contextlib.suppress(OSError):
                        os.remove(slot[0])
        self.slots = []


class LayerStream:
    """Iterate over decoder layers with the calibration hidden states that enter each one.

    ``calibration``: ``[samples, tokens]`` token ids. ``batch_size``: samples per layer forward (0 = all).
    ``autocast``: a lower-precision dtype (``torch.bfloat16``) the layers' matrix products run in under
    ``torch.autocast`` while the carried hidden states (the residual stream) stay in the model's dtype.
    ``states``: where the carried hidden states live (``auto`` | ``device`` | ``host`` | ``disk``, module
    docstring); ``copies``: how many stores of them the method keeps at once (what ``auto`` budgets for: 2 for a
    method that carries the dense model's states too, or compares inputs with :meth:`forward`'s outputs).
    """

    def __init__(self, model: nn.Module, calibration: torch.Tensor, *, batch_size: int = 0,
                 device: Optional[str | torch.device] = None, offload: bool = False, progress: bool = False,
                 autocast: Optional[torch.dtype] = None, states: str = "auto", copies: int = 1,
                 states_dir: Optional[str] = None):
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
        hidden = int(getattr(model.config, "hidden_size", 0) or model.model.embed_tokens.embedding_dim)
        self.states_bytes = self.tokens * hidden * torch.empty(0, dtype=self.dtype).element_size()
        self.placement = resolve_states(states, max(1, copies) * self.states_bytes, self.device)
        self._scratch = Scratch(states_dir) if self.placement == "disk" else None
        self.index = -1
        self.seconds: dict[str, float] = {"embed": 0.0, "layers": 0.0}
        t0 = time.perf_counter()
        self._hidden, self.kwargs = self._embed()
        self.seconds["embed"] = time.perf_counter() - t0

    def new_states(self) -> States:
        """An empty store with this stream's placement."""
        return States(self.placement, self.device, self._scratch)

    def close(self) -> None:
        """Drop the carried states (and the scratch files of ``states=disk``)."""
        self._hidden.clear()
        if self._scratch is not None:
            self._scratch.close()

    # -- the first layer's inputs ------------------------------------------------------------------------------
    def _embed(self) -> tuple[States, list[dict[str, Any]]]:
        inner = self.model.model
        first = self.layers[0]
        moved = [m for m in (inner.embed_tokens, getattr(inner, "rotary_emb", None), first) if m is not None]
        if self.offload:
            for m in moved:
                m.to(self.device)
        hidden, kwargs = self.new_states(), []

        def grab(_m: nn.Module, args: tuple, kw: dict) -> None:
            x = args[0] if args else kw.pop("hidden_states")
            hidden.append(x.detach())  # to the store at once: one micro-batch on the device at a time
            kw = {k: v for k, v in kw.items() if k != "hidden_states"}
            kw["use_cache"] = False
            kw.pop("past_key_values", None)
            kw.pop("cache", None)  # transformers >= 5.24
            # micro-batches of the same shape get the same positions and mask: keep one copy of them
            same = next((k for k in kwargs if _same_kwargs(k, kw)), None)
            kwargs.append(same if same is not None else kw)
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

    @property
    def hidden(self) -> States:
        """The hidden states entering the current layer (a :class:`States`; iterate or index to load them)."""
        return self._hidden

    @hidden.setter
    def hidden(self, value: States | list[torch.Tensor]) -> None:
        self._hidden = self._as_states(value)

    def _as_states(self, value: States | list[torch.Tensor]) -> States:
        if isinstance(value, States):
            return value
        store = self.new_states()
        for x in value:
            store.append(x)
        return store

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """No autograd, the stream's autocast, and the time counted as layer time."""
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), self._autocast():
                yield
        finally:
            self.seconds["layers"] += time.perf_counter() - t0

    def call(self, layer: nn.Module, x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
        """``layer(x, **kw)``'s hidden states (under :meth:`running`)."""
        with self.running():
            y = layer(x, **kw)
        return (y[0] if isinstance(y, tuple) else y).detach()

    def forward(self, layer: Optional[nn.Module] = None,
                inputs: Optional[States | list[torch.Tensor]] = None) -> States:
        """The current layer (or ``layer``) over every micro-batch of ``inputs`` (default: the carried states),
        into a new store (a second copy of the states: :meth:`advance` without outputs updates in place)."""
        layer = self.layer if layer is None else layer
        inputs = self.hidden if inputs is None else self._as_states(inputs)
        out = self.new_states()
        for j, kw in enumerate(self.kwargs):
            out.append(self.call(layer, inputs.load(j), kw))
        return out

    def run(self, fn: Callable[[torch.Tensor, dict[str, Any]], Any]) -> list[Any]:
        """``fn(hidden, layer_kwargs)`` over every micro-batch (for methods that run a layer piece by piece);
        the list of what it returns (keep it small: statistics, or None)."""
        out = []
        for j, kw in enumerate(self.kwargs):
            x = self.hidden.load(j)
            with self.running():
                out.append(fn(x, kw))
        return out

    def update(self, fn: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor],
               states: Optional[States] = None) -> None:
        """Replace each micro-batch ``x`` of ``states`` (default: the carried ones) by ``fn(x, layer_kwargs)``, one
        at a time (no second copy)."""
        states = self.hidden if states is None else states
        for j, kw in enumerate(self.kwargs):
            x = states.load(j)
            with self.running():
                y = fn(x, kw)
            states.put(j, y.detach())

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def advance(self, outputs: Optional[States | list[torch.Tensor]] = None, *,
                layer: Optional[nn.Module] = None) -> None:
        """Move to the next layer's inputs: ``outputs`` if given (e.g. from :meth:`forward`), else the current (or
        ``layer``, possibly edited) layer is run again over the carried states, each micro-batch's output written
        over its input. Hooks active around the call see every micro-batch's inputs (statistics on the way)."""
        if outputs is not None:
            old, self.hidden = self._hidden, outputs
            if old is not self._hidden:
                old.clear()
            return
        layer = self.layer if layer is None else layer
        self.update(lambda x, kw: _hidden_of(layer(x, **kw)))

    @property
    def activation_bytes(self) -> int:
        return self.hidden.nbytes


def _hidden_of(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


def _same_kwargs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two micro-batches' layer keyword arguments are equal (tensors by value)."""
    if a.keys() != b.keys():
        return False
    return all(_same_value(a[k], b[k]) for k in a)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # objects without a plain equality: never shared
        return False
