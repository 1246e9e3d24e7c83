"""Real efficiency of a (compressed) causal LM, measured the same way for every model.

Size: parameters (tied weights once), non-zero parameters, weight bytes, bytes on disk
(a checkpoint dir's files when given). Speed: prefill tokens/s on a fixed ``[batch,
prompt_len]`` random prompt, then greedy decode with the KV cache (per-token latency
and tokens/s), each timed ``repeats`` times after ``warmup`` untimed runs, median
reported. Memory: peak allocated bytes on CUDA; on CPU the peak RSS increase above the
resident baseline, sampled every 2 ms (activations + KV cache; weights are already
resident), so two models measured in one process get comparable numbers.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any, Optional

import psutil
import torch

from core.models.llama import cache_kwarg, output_cache, unique_parameters


def size_stats(model: torch.nn.Module, checkpoint_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """Parameter counts and bytes; ``disk_bytes`` only when the model has a saved dir."""
    params = unique_parameters(model)
    out: dict[str, Any] = {
        "params": sum(p.numel() for p in params),
        "nonzero_params": int(sum(int(torch.count_nonzero(p.detach())) for p in params)),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "dtype": str(params[0].dtype).removeprefix("torch.") if params else None,
    }
    if checkpoint_dir is not None and Path(checkpoint_dir).is_dir():
        files = [f for f in Path(checkpoint_dir).rglob("*") if f.is_file()]
        out["disk_bytes"] = sum(f.stat().st_size for f in files)
        out["disk_weight_bytes"] = sum(f.stat().st_size for f in files if f.suffix in (".safetensors", ".bin", ".pt"))
    return out


class _PeakMemory:
    """Peak memory used above the level at entry: CUDA allocator stats or sampled process RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._proc = psutil.Process()
            self._base = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss - self._base)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._proc.memory_info().rss - self._base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_bytes(obj: Any, seen: Optional[set[int]] = None, depth: int = 0) -> int:
    """Bytes of every tensor reachable from a KV cache object (DynamicCache, tuples, ...), once each."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("transformers"):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


@torch.no_grad()
def _prefill_and_decode(model, ids: torch.Tensor, decode_tokens: int) -> tuple[float, list[float], int]:
    """Prefill seconds, per-step seconds of greedy decoding with the KV cache, final KV cache bytes."""
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - t0
    past = output_cache(out)
    nxt = out.logits[:, -1:].argmax(-1)  # [batch, 1]
    steps = []
    key = cache_kwarg()
    for _ in range(decode_tokens):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, use_cache=True, **{key: past})
        _sync(device)
        steps.append(time.perf_counter() - t0)
        past = output_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)
    return prefill, steps, _tensor_bytes(past)


def measure_efficiency(
    model: torch.nn.Module,
    *,
    prompt_len: int = 128,
    batch_size: int = 1,
    decode_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 3,
    checkpoint_dir: Optional[str | Path] = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Size, prefill/decode throughput and latency (medians over ``repeats``), peak memory."""
    if prompt_len < 1 or batch_size < 1 or decode_tokens < 0 or repeats < 1 or warmup < 0:
        raise ValueError("efficiency: need prompt_len, batch_size, repeats >= 1 and decode_tokens, warmup >= 0")
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    # Random ids: throughput does not depend on the text, and every model gets the same prompt.
    ids = torch.randint(0, vocab, (batch_size, prompt_len), generator=gen).to(device)  # [B, T]
    was_training = model.training
    model.eval()
    prefills, step_medians = [], []
    with _PeakMemory(device) as mem:  # from before the warm-up: its first run is when buffers grow
        for _ in range(warmup):
            _prefill_and_decode(model, ids, min(decode_tokens, 4))
        for _ in range(repeats):
            prefill, steps, kv_bytes = _prefill_and_decode(model, ids, decode_tokens)
            prefills.append(prefill)
            if steps:
                step_medians.append(statistics.median(steps))
    model.train(was_training)
    prefill_s = statistics.median(prefills)
    out = size_stats(model, checkpoint_dir)
    out.update({
        "device": str(device),
        "threads": torch.get_num_threads(),
        "prompt_len": prompt_len,
        "batch_size": batch_size,
        "decode_tokens": decode_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "prefill_seconds": prefill_s,
        "prefill_tokens_per_s": batch_size * prompt_len / prefill_s,
        "kv_cache_bytes": int(kv_bytes),  # after prompt_len + decode_tokens positions
    })
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(mem._base + mem.peak)  # absolute max_memory_allocated
        out["peak_memory_kind"] = "cuda max allocated (weights + activations + KV cache)"
    else:
        # Process RSS is not per model (the heap keeps what an earlier model freed), so the
        # comparable CPU figure is weights + the KV cache actually built; RSS growth is kept as a hint.
        out["peak_memory_bytes"] = int(out["weight_bytes"] + kv_bytes)
        out["peak_memory_kind"] = "weights + KV cache (CPU)"
        out["rss_growth_bytes"] = int(mem.peak)
    if step_medians:
        latency = statistics.median(step_medians)
        out["decode_latency_ms"] = 1000.0 * latency  # one new token for the whole batch
        out["decode_tokens_per_s"] = batch_size / latency
    return out
