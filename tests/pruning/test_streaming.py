"""The layer stream reproduces the model's own forward, one layer at a time."""

import random

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
    hidden = torch.cat(list(stream.hidden))
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


# --------------------------------------------------------------------------- where the hidden states live


@pytest.mark.parametrize("states", ["device", "host", "disk"])
def test_every_placement_reproduces_the_forward(tiny, calib, states, tmp_path):
    import os

    tiny, _ = tiny
    with torch.no_grad():
        ref = tiny(calib).logits
    stream = LayerStream(tiny, calib, batch_size=3, states=states, states_dir=str(tmp_path))
    assert stream.placement == states
    for _i, _layer in stream:
        stream.advance()  # in place
        if states == "disk":  # one file per micro-batch, nothing else
            assert len(os.listdir(stream.hidden.scratch.path)) == len(stream.chunks)
    logits = tiny.lm_head(tiny.model.norm(torch.cat(list(stream.hidden))))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    stream.close()
    assert os.listdir(tmp_path) == []  # the scratch directory is gone


def test_auto_takes_the_device_then_the_host_then_disk(monkeypatch):
    from pruning import streaming

    monkeypatch.setattr(streaming, "host_available", lambda: 1000)
    assert streaming.resolve_states("auto", 400, "cpu") == "device"  # a CPU run's device is the host
    assert streaming.resolve_states("auto", 600, "cpu") == "disk"  # over STATES_SHARE of what is available
    assert streaming.resolve_states("host", 10**12, "cpu") == "host"  # an explicit choice is kept
    monkeypatch.setattr(streaming, "device_free", lambda d: 100)
    assert streaming.resolve_states("auto", 40, "cuda") == "device"
    assert streaming.resolve_states("auto", 400, "cuda") == "host"
    assert streaming.resolve_states("auto", 600, "cuda") == "disk"
    with pytest.raises(ValueError, match="not one of"):
        streaming.resolve_states("ram", 1, "cpu")


def test_the_states_option_is_checked_with_the_pruners_options():
    from core.run.errors import ConfigError
    from pruning.obs.pruner import StructuredOBS
    from pruning.options import stream_option_errors
    from pruning.wanda import Wanda

    assert stream_option_errors(8, False, None, "disk") == []
    errors = stream_option_errors(8, False, None, "ram")
    assert len(errors) == 1 and "pruner.states='ram' is not one of auto, device, host, disk" in errors[0]
    with pytest.raises(ConfigError, match="pruner.states"):
        StructuredOBS(states="ram")
    with pytest.raises(ConfigError, match="pruner.states"):
        Wanda(states="ram")


# --------------------------------------------------------------------------- the streamed fit (pruning/obs/fit.py)


def _obs_options(**kw):
    from pruning.obs.pruner import StructuredOBS

    base = dict(ratio=0.2, tokens=None, seq_len=24, progress=False, autocast=None, batch_size=3)
    return StructuredOBS(**{**base, **kw}).fit_options()


@pytest.mark.parametrize("target", ["layer", "dense"])
def test_the_streamed_fit_equals_the_fit_from_captured_inputs(tiny, target):
    """Every down_proj fit of the pass (from sums folded micro-batch by micro-batch, the guard from sums) equals
    ProjectionFit over the same inputs captured whole (the guard measuring on the held-out tokens themselves):
    the same channels, the same guard decision, weights and errors within float tolerance. (target=dense: the
    first pruned layer, whose targets are its own outputs.)"""
    from pruning.obs.fit import ProjectionFit, fit_sums, held_out_samples, prune_sequential

    tiny, _ = tiny
    calib = torch.randint(0, 256, (10, 24), generator=torch.Generator().manual_seed(1))
    opt = _obs_options(target=target)
    held_n = held_out_samples(calib.shape[0], opt)
    layers = tiny.model.layers
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda m, a, i=i: seen[i].append(a[0].detach().clone()) if a[0].shape[-1] == 128 else None)
        for i, layer in enumerate(layers)]
    compared = []

    def check(w, b, sums, remove, group, options):
        got = fit_sums(w, b, sums, remove, group, options)
        i = next(i for i, l in enumerate(layers) if l.mlp.down_proj.weight is w)
        if target == "dense" and i > 0:
            return got
        xs = torch.cat(seen[i])  # this layer's inputs over the samples, in order (one forward of the pruned stream)
        fit_x, held_x = xs[: calib.shape[0] - held_n], xs[calib.shape[0] - held_n:]
        targets = (None, None) if target == "layer" else ([fit_x @ w.T], [held_x @ w.T])
        want = ProjectionFit(w, b, [fit_x], [held_x], options, *targets, group=group).remove(remove)
        assert got.removed == want.removed
        assert got.record["update"] == want.record["update"]
        torch.testing.assert_close(got.weight, want.weight, rtol=1e-4, atol=1e-5)
        for k in ("heldout_error", "heldout_error_plain"):
            assert got.record[k] == pytest.approx(want.record[k], rel=1e-4)
        compared.append(i)
        return got

    try:
        records = prune_sequential(tiny, calib, {}, {0: 20, 1: 20, 2: 20, 3: 20}, options=opt, fit=check)
    finally:
        for h in handles:
            h.remove()
    assert compared == ([0, 1, 2, 3] if target == "layer" else [0])
    assert [r["layer"] for r in records] == [0, 1, 2, 3]


class _LiveBytes:
    """Counts the bytes of CPU tensor storages created by torch ops and still alive (a dispatch mode with weak
    references): ``peak`` is the most alive at once."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.live: dict[int, list[int]] = {}
        self.now = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        counter.track(t)
                return out

        self.mode = Mode()

    def track(self, t: torch.Tensor) -> None:
        import weakref

        storage = t.untyped_storage()
        key = storage.data_ptr()
        if not key:
            return
        entry = self.live.setdefault(key, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(t, self.release, key)

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


def _peak_of_prune(samples: int, states: str, tmp_path) -> int:
    from core.models.load import build_tiny
    from pruning.obs.fit import prune_sequential

    model, _ = build_tiny(num_layers=2, hidden_size=64, intermediate_size=256, num_heads=8, num_kv_heads=2, seed=0)
    calib = torch.randint(0, 256, (samples, 64), generator=torch.Generator().manual_seed(0))
    opt = _obs_options(target="dense", seq_len=64, batch_size=2, states=states)
    counter = _LiveBytes()
    with counter.mode:
        prune_sequential(model, calib, {0: 1}, {0: 40, 1: 40}, options=opt)
    return counter.peak


def test_the_peak_of_a_layer_step_does_not_grow_with_the_calibration_samples(tmp_path, monkeypatch):
    """With the hidden states on disk, the pass holds one micro-batch of activations and the fits' sums: its peak
    of live CPU tensors is the same for 8 and 48 samples. With them in memory the peak grows by their bytes (the
    counter sees it)."""
    monkeypatch.setenv("PRUNELAB_STATES_DIR", str(tmp_path))
    small, large = _peak_of_prune(8, "disk", tmp_path), _peak_of_prune(48, "disk", tmp_path)
    assert large <= small * 1.02
    per_sample = 64 * 64 * 4  # one sample's hidden states (float32)
    grown = _peak_of_prune(48, "device", tmp_path) - _peak_of_prune(8, "device", tmp_path)
    assert grown >= 2 * 40 * per_sample * 0.9  # the pruned and the dense stream's states
    captured = 40 * 64 * 256 * 4  # what keeping 40 more samples' down_proj inputs would add
    assert large < small + captured / 4


def test_search_variants_beyond_the_memory_bound_live_on_disk_and_apply_the_same(monkeypatch):
    from core.models.load import build_tiny
    from pruning.obs import search
    from pruning.obs.search import BudgetLevels, build_variants

    calib = torch.randint(0, 256, (12, 24), generator=torch.Generator().manual_seed(0))
    opt = _obs_options(allocation="search", search_budget=8, search_tokens=48)

    def variants(limit):
        monkeypatch.setattr(search, "VARIANT_MEMORY_BYTES", limit)
        model, _ = build_tiny(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2,
                              seed=0)
        from core.models.llama import Geometry

        space = BudgetLevels.around(Geometry.of(model), (0, 4), 100)
        return model, space, build_variants(model, calib, {}, space, opt)

    a, space, in_memory = variants(10**12)
    b, _, on_disk = variants(0)
    assert in_memory.store.on_disk == 0 and on_disk.store.in_memory == 0 and on_disk.store.on_disk > 0
    path = on_disk.store.scratch.path
    counts = space.counts(space.random(random.Random(1)))
    in_memory.apply(a, counts)
    on_disk.apply(b, counts)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, msg=k)
    on_disk.restore(b)
    import os

    assert not os.path.exists(path)  # the scratch directory goes with the variants
