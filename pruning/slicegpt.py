"""SliceGPT (Ashkboos et al. 2024): rotate the residual stream by PCA, then delete its weakest coordinates.

    python run.py pruner=slicegpt pruner.sparsity=0.25          # hidden size 576 -> 432 on SmolLM2

As in github.com/microsoft/TransformerCompression (``layernorm_fusion.fuse_modules``,
``rotate.rotate_and_slice_sequential``, ``ConstSlicingScheduler``, ``experiments/run_slicegpt.py``):

1. Each RMSNorm's scale is fused into the linears that read its output (q/k/v, gate/up, the LM head); the norms
   become weightless and divide by the original hidden size (``core.models.modeling_sliced.SlicedRMSNorm``), so
   an orthogonal ``Q`` on the residual stream commutes with them. As in ``fuse_modules``, each embedding row
   first loses its mean (in float64; ``center_embeddings``, on by default): exact for the LayerNorm models that
   step was written for, a small change of a Llama's outputs (the LM head, untied, keeps the uncentered rows).
2. The stream is sliced at every point where it is stored: after the embedding, after each attention block,
   after each MLP block. At each point the calibration activations *of the already sliced prefix*, in the
   original basis, give ``H = sum x^T x`` (float64, damped by 1% of its mean diagonal); its eigenvectors sorted
   by eigenvalue are ``Q``. The writer of the stream (embedding, o_proj, down_proj) is rotated by ``Q`` and keeps
   the first ``d`` columns; the readers (q/k/v, gate/up, LM head) get ``Q[:, :d]`` on their inputs; the residual
   carries ``attn_shortcut_Q = Q_in[:, :d_in]^T Q_attn[:, :d]`` and ``mlp_shortcut_Q`` likewise.
3. ``d = int((1 - sparsity) * hidden)`` rounded down to a multiple of ``round_interval`` (run_slicegpt's
   ``--round-interval 8``), the same at every point, except the last layer's output and the LM head, which
   keep the full hidden size unless ``slice_head`` (SliceGPT's ``do_slice_head``, off by default).
   ``final_orientation=random`` (run_slicegpt's default) turns each kept subspace by a random orthogonal
   matrix (QR of a uniform one, seeded by ``seed``); ``pca`` keeps the principal axes. Neither changes outputs.

Against the original (``tests/bench/slicegpt_peer_bench.py`` runs Microsoft's code from its own environment on the
same SmolLM2 tokens, ``tests/bench/results/slicegpt_peer.jsonl``): the defaults compute the original's model. Until
issue 26 the embedding mean subtraction was left out, which looked harmless (it moves SmolLM2's dense perplexity
by 0.2%) but changes every PCA that follows: the sliced model was another one, with more perplexity damage than
the original's in the bench. ``center_embeddings=false`` keeps that form for its one property: with
``sparsity=0`` the rotated model reproduces the dense logits (a check of the rotation alone). Kept departures, none
of which changes the model beyond rounding: each decoder layer runs once (the attention half, then PCA, then the
MLP half on the rotated stream) where SliceGPT runs it twice, which computes the same thing; the shortcut products
``Q_in^T Q_out`` are formed in float64 (SliceGPT multiplies them in the model's dtype);
``rotation_dtype=float32`` rotates the weights in float32 instead of SliceGPT's float64 (a faster rotation for
large models; ``tests/pruning/test_slicegpt.py`` holds it to float32 rounding of the default).

Quality is very sensitive to the calibration domain, as in the paper. ``tests/pruning/test_slicegpt.py`` checks
this implementation against a float64 transcription of ``fuse_modules`` and ``rotate_and_slice_sequential``.
Measured on SmolLM2-135M with 32x128 calibration tokens at sparsity 0.1 (before the embedding mean subtraction):
perplexity on BoolQ passages goes 26.9 -> 43 when calibrated on other BoolQ passages, but -> 120-134 when calibrated on Austen, which stays near its own held-out perplexity
(56.6 -> 62.7). The Austen-calibrated PCA drops 0.2% of the embedding's energy on Austen tokens and 2.3% on BoolQ
tokens. In the deeper layers, rescaling every token to unit norm (the norms see only its direction) or leaving out
the attention-sink first token did not help.

Cost: one forward of every decoder layer over the calibration tokens (streamed by
:class:`pruning.streaming.LayerStream`, never the LM head), ``2 * depth + 1`` float64 covariances
(``tokens x hidden^2``) and symmetric eigendecompositions (``hidden^3``), and each weight rotated once (by row
blocks of at most 8 MiB, so no large matrix is ever copied whole). Memory: the model, a new embedding matrix, the
carried hidden states, one layer's activations, a ``hidden x hidden`` float64 covariance. A tied embedding is
untied (the embedding and the LM head carry different rotations): ``vocab x hidden`` more parameters, and the
shortcuts add ``2 d^2`` per layer, so on a small tied model such as SmolLM2 the sliced model can have more
parameters than the dense one. ``offload=true`` with ``device=cuda`` keeps the model on the CPU and moves one
layer at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from core.models.llama import count_params, is_uniform
from core.run.errors import ConfigError
from pruning import PruneError, PruneResult
from pruning.options import resolve_ratio_target, stream_option_errors

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

ORIENTATIONS = ("random", "pca")
ROTATION_DTYPES = ("float64", "float32")
BLOCK_BYTES = 8 * 2**20  # float64 bytes of one row block of a rotated weight / activation / covariance input
# footprint(): float64 hidden x hidden matrices alive at once around a PCA (covariance, its damped copy and
# eigendecomposition workspace, the eigenvectors, the sorted rotation)
PCA_MATRICES = 4


@dataclass(frozen=True)
class SliceGPT:
    """Slice the hidden dimension to ``1 - sparsity`` of its width after PCA rotations (all layers).

    ``sparsity`` is the top-level ``ratio`` (conf/pruner/slicegpt.yaml), read as :attr:`RATIO` says.
    """

    RATIO: ClassVar[dict[str, str]] = {
        "slicing": "share of the hidden size sliced away, in every layer and the embedding: width "
                   "int((1 - ratio) * hidden), rounded down to a multiple of pruner.round_interval (pruner.sparsity)",
    }

    sparsity: float = 0.25
    ratio_target: Optional[str] = None  # slicing, the one unit (RATIO)
    name: str = "slicegpt"
    round_interval: int = 8  # sliced widths are multiples of this
    final_orientation: str = "random"  # random | pca: basis of each kept subspace
    slice_head: bool = False  # also slice the last layer's output and the LM head's input
    center_embeddings: bool = True  # SliceGPT's fuse_modules: subtract each embedding row's mean (false: exact at 0)
    rotation_dtype: str = "float64"  # float64 (SliceGPT) | float32: the dtype weights are rotated in
    seed: int = 0  # the random orientations
    batch_size: int = 0  # calibration samples per layer forward (0 = all)
    offload: bool = False  # keep the model where it is, move one layer at a time to `device`
    device: Optional[str] = None  # where layers run and PCA is computed (None = the model's device)
    states: str = "auto"  # where the calibration hidden states live: auto | device | host | disk (docs/scale.md)
    progress: bool = True

    def __post_init__(self) -> None:
        errors = []
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 <= float(self.sparsity) < 1.0:
            errors.append(f"pruner.sparsity={self.sparsity!r} must be in [0, 1) (the share of the hidden size sliced)")
        v = self.round_interval
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            errors.append(f"pruner.round_interval={v!r} must be an integer >= 1")
        if self.final_orientation not in ORIENTATIONS:
            errors.append(f"pruner.final_orientation={self.final_orientation!r} is not one of "
                          f"{', '.join(ORIENTATIONS)}")
        if self.rotation_dtype not in ROTATION_DTYPES:
            errors.append(f"pruner.rotation_dtype={self.rotation_dtype!r} is not one of {', '.join(ROTATION_DTYPES)}")
        for key in ("slice_head", "center_embeddings", "progress"):
            if not isinstance(getattr(self, key), bool):
                errors.append(f"pruner.{key}={getattr(self, key)!r} must be true or false")
        errors += stream_option_errors(self.batch_size, self.offload, self.device, self.states)
        errors += resolve_ratio_target(self)
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def ratio(self) -> float:
        """``sparsity``, under the name every pruner's ``ratio`` has (the run record's)."""
        return float(self.sparsity)

    @property
    def needs_calibration(self) -> bool:
        return True

    def check(self, depth: int) -> None:
        if depth < 1:
            raise PruneError(f"pruner={self.name}: the model has no decoder layers to slice")

    def width(self, hidden: int) -> int:
        """The sliced width of a ``hidden``-wide stream (SliceGPT's new_embedding_dimension)."""
        d = int((1.0 - float(self.sparsity)) * hidden)
        return d - d % self.round_interval

    def plan(self, hidden: int, depth: int) -> dict:
        """``config.slicing`` of the sliced model (``core.models.modeling_sliced``); PruneError for a width of 0
        or, with ``sparsity > 0``, the full width."""
        d = self.width(hidden)
        raw = int((1.0 - float(self.sparsity)) * hidden)
        if d <= 0:
            raise PruneError(f"pruner.sparsity={self.sparsity} leaves int({1 - float(self.sparsity):.4g} x {hidden}) "
                             f"= {raw} of {hidden} hidden dims, which rounds down to width {d} with "
                             f"pruner.round_interval={self.round_interval}: nothing would remain (lower the sparsity "
                             "or the round_interval)")
        if d >= hidden and float(self.sparsity) > 0:
            raise PruneError(f"pruner.sparsity={self.sparsity} rounds to the full width {d} of {hidden} with "
                             f"pruner.round_interval={self.round_interval}: nothing would be sliced (sparsity=0 "
                             "rotates without slicing)")
        last = d if self.slice_head else hidden
        layers = [{"attention_input": d, "attention_output": d, "mlp_output": d} for _ in range(depth)]
        layers[-1]["mlp_output"] = last
        return {"embedding_dimension": d, "lm_head_dimension": last, "layers": layers}

    def footprint(self, cfg: dict, tokens: int, dtype: str, device: str, *, seq_len: int = 128,
                  free: Optional[tuple[Optional[int], Optional[int]]] = None) -> Any:
        """Peak memory and work of this slicing on a model of ``config.json`` ``cfg`` (torch-free;
        core/run/plan.py): the layer stream (pruning/memory.py: weights, the carried hidden states (one copy, where ``states`` puts them), one
        layer's forward on a micro-batch), the rotated copy of a micro-batch, the float64 covariance, its
        eigendecomposition and the rotation (:data:`PCA_MATRICES` x ``hidden^2`` x 8 bytes) where the layers run,
        and the new embedding matrix beside the old one where the model is. Every layer runs once."""
        from core.run.plan import dtype_bytes, hidden_bytes
        from pruning.memory import micro_batch, stream

        hidden, depth, vocab = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
        slicing = self.plan(hidden, depth)
        d = slicing["embedding_dimension"]
        p = stream(cfg, tokens=tokens, seq_len=seq_len, batch_size=self.batch_size, dtype=dtype, model_device=device,
                   device=self.device, offload=self.offload, states=self.states, device_free=(free or (None,))[0],
                   host_free=(free or (None, None))[1])
        b = micro_batch(tokens, seq_len, self.batch_size)
        p.add(**{"rotated micro-batch": hidden_bytes(b * int(seq_len), cfg, "float32"),
                 "PCA (float64 covariance, eigenvectors)": PCA_MATRICES * hidden * hidden * 8})
        new_embedding = vocab * d * dtype_bytes(dtype, cfg)
        if p.on_device and (self.offload and self.device):
            p.add_host(**{"new embedding": new_embedding})
        else:
            p.add(**{"new embedding": new_embedding})
        removes = [f"hidden size {hidden} -> {d} everywhere the residual stream is stored (sparsity {self.sparsity}, "
                   f"multiples of {self.round_interval}); LM head input {slicing['lm_head_dimension']}; "
                   f"+2 x {d}^2 shortcut parameters per layer"]
        widths = [{"layer": i, **{k: [hidden, v] for k, v in lc.items()}} for i, lc in enumerate(slicing["layers"])]
        return p.footprint(layer_forwards=depth, tokens=int(tokens), removes=removes, widths=widths)

    def __call__(self, model: nn.Module, calibration: Optional[torch.Tensor]) -> PruneResult:
        # local: imports torch, and config validation imports this module
        from pruning.streaming import check_calibration, check_llama_layout, check_stream_device

        check_llama_layout(model, f"pruner={self.name}")
        if getattr(model.config, "slicing", None):
            raise PruneError(f"pruner={self.name}: the model is already sliced (config.slicing); slice the dense "
                             "model once with the total sparsity instead")
        if not is_uniform(model):
            raise PruneError(f"pruner={self.name}: the layers have per-layer head / MLP widths or added biases (an "
                             "already pruned model); SliceGPT here slices models with the config's own widths")
        check_calibration(calibration, f"pruner={self.name}")
        check_stream_device(model, self.device, self.offload)
        slicing = self.plan(model.config.hidden_size, len(model.model.layers))
        log.info("slicing %s: hidden %d -> %d (sparsity %.3f, round_interval %d, LM head %d, orientation %s)",
                 self.name, model.config.hidden_size, slicing["embedding_dimension"], self.sparsity,
                 self.round_interval, slicing["lm_head_dimension"], self.final_orientation)
        return rotate_and_slice(model, calibration, self, slicing)


# --------------------------------------------------------------------------- linear algebra


def _times(w: torch.Tensor, q: torch.Tensor, scale: Optional[torch.Tensor] = None,
           out: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
           center: bool = False) -> torch.Tensor:
    """``(w * scale) @ q`` by row blocks, computed in ``dtype`` (default float32, or ``w``'s dtype if wider) and
    returned in ``w``'s dtype and device (into ``out`` if given, which may be ``w`` itself: each row block is read
    before it is written).

    ``w``: ``[rows, n]`` anywhere; ``q``: ``[n, k]`` on the compute device; ``scale``: ``[n]``, the fused norm weight.
    ``center``: each row of ``w`` first loses its mean, in float64 and stored back in ``w``'s dtype (SliceGPT's
    ``fuse_modules`` on the embedding), then is rotated.
    """
    # local: imports torch, and config validation imports this module
    import torch

    q = q.to(torch.promote_types(w.dtype, dtype or torch.float32))
    if out is None:
        out = torch.empty(w.shape[0], q.shape[1], dtype=w.dtype, device=w.device)
    step = max(1, BLOCK_BYTES // (8 * max(w.shape[1], q.shape[1])))
    s = None if scale is None else scale.to(q.device, q.dtype)
    for r in range(0, w.shape[0], step):
        block = w[r:r + step].to(q.device)
        if center:
            block = _centered(block)
        block = block.to(q.dtype)
        if s is not None:
            block = block * s
        out[r:r + step] = (block @ q).to(out.dtype)
    return out


def _centered(x: torch.Tensor) -> torch.Tensor:
    """``x`` minus the mean of its last dimension, computed in float64 and returned in ``x``'s dtype (SliceGPT's
    embedding mean subtraction, ``layernorm_fusion.fuse_modules``)."""
    # local: imports torch, and config validation imports this module
    import torch

    x64 = x.to(torch.float64)
    return (x64 - x64.mean(dim=-1, keepdim=True)).to(x.dtype)


def _set_weight(lin: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    # local: imports torch, and config validation imports this module
    from torch import nn

    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.out_features, lin.in_features = weight.shape
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)


def _rotate_inputs(lin: nn.Linear, q: torch.Tensor, scale: Optional[torch.Tensor],
                   dtype: Optional[torch.dtype] = None) -> None:
    """A reader of the stream: ``W <- (W * scale) Q[:, :d]`` (its inputs rotated and sliced)."""
    _set_weight(lin, _times(lin.weight.data, q, scale, dtype=dtype))


def _rotate_outputs(lin: nn.Linear, q: torch.Tensor, dtype: Optional[torch.dtype] = None) -> None:
    """A writer of the stream: ``W <- Q[:, :d]^T W``, ``b <- Q[:, :d]^T b`` (its outputs rotated and sliced)."""
    w = _times(lin.weight.data.t(), q, dtype=dtype).t().contiguous()
    b = None
    if lin.bias is not None:
        b = _times(lin.bias.data[None], q, dtype=dtype)[0]
    _set_weight(lin, w, b)


def _in_basis(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Activations ``[.., n]`` in the basis ``q`` (``[n, d]``), in their own dtype (SliceGPT: in the model's)."""
    return _times(x.reshape(-1, x.shape[-1]), q).reshape(*x.shape[:-1], q.shape[1])


def principal_axes(xs: list[torch.Tensor], keep: int, orientation: str, gen: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """SliceGPT's ``pca_calc``: eigenvectors of ``sum x^T x`` + 1% of its mean diagonal, by decreasing eigenvalue
    (float64 ``[n, n]`` on ``device``); ``random`` then turns the first ``keep`` columns by a random orthogonal
    matrix (``random_orthogonal_upper_left``)."""
    # local: imports torch, and config validation imports this module
    import torch

    n = xs[0].shape[-1]
    cov = torch.zeros(n, n, dtype=torch.float64, device=device)
    step = max(1, BLOCK_BYTES // (8 * n))
    for x in xs:
        rows = x.reshape(-1, n)
        for r in range(0, rows.shape[0], step):
            block = rows[r:r + step].to(device, torch.float64)
            cov.addmm_(block.T, block)
    cov.diagonal().add_(0.01 * cov.diagonal().mean())
    values, vectors = torch.linalg.eigh(cov)
    q = vectors[:, torch.argsort(values, descending=True)]
    if orientation == "random":
        turn, _ = torch.linalg.qr(torch.rand(keep, keep, generator=gen, dtype=torch.float64))
        q[:, :keep] = q[:, :keep] @ turn.to(device)
    return q


# --------------------------------------------------------------------------- driver


def rotate_and_slice(model: nn.Module, calibration: torch.Tensor, spec: SliceGPT, slicing: dict) -> PruneResult:
    """Slice ``model`` in place to ``slicing``'s widths (``SliceGPT.plan``); ``calibration``: ``[n, seq_len]`` ids.

    The model keeps its class; its layers become ``SlicedLlamaDecoderLayer``, its norms ``SlicedRMSNorm``, and
    ``config.slicing`` is set, which is what ``core.models.checkpoint.save_checkpoint`` saves as a sliced checkpoint.
    """
    # local: imports torch, and config validation imports this module
    import torch

    from core.models.modeling_sliced import SlicedLlamaDecoderLayer, SlicedRMSNorm
    from pruning.streaming import LayerStream

    cfg, inner = model.config, model.model
    hidden, eps, depth = cfg.hidden_size, cfg.rms_norm_eps, len(inner.layers)
    dtype = next(model.parameters()).dtype
    params_before = count_params(model)
    tied = model.lm_head.weight is inner.embed_tokens.weight
    was_training = model.training
    model.eval()
    stream = LayerStream(model, calibration, batch_size=spec.batch_size, device=spec.device, offload=spec.offload,
                         progress=spec.progress, states=spec.states)
    dev = stream.device
    gen = torch.Generator().manual_seed(spec.seed)
    rot = getattr(torch, spec.rotation_dtype)  # weights are rotated in this dtype, stored in the model's
    t_pca = t_rot = 0.0

    def axes(xs: list[torch.Tensor], keep: int) -> torch.Tensor:
        nonlocal t_pca
        t0 = time.perf_counter()
        q = principal_axes(xs, keep, spec.final_orientation, gen, dev)
        t_pca += time.perf_counter() - t0
        return q

    with torch.no_grad():
        # The embedding writes the stream: rotated and sliced (a new tensor: a tied LM head keeps the old one).
        d0 = slicing["embedding_dimension"]
        if spec.center_embeddings:  # the embedding rows lose their means: so do the first layer's inputs
            stream.update(lambda x, kw: _centered(x))
        q = axes(stream.hidden, d0)
        t0 = time.perf_counter()
        emb = inner.embed_tokens
        emb.weight = torch.nn.Parameter(_times(emb.weight.data, q[:, :d0], dtype=rot, center=spec.center_embeddings),
                                        requires_grad=False)
        emb.embedding_dim = d0
        t_rot += time.perf_counter() - t0
        for i, layer in stream:  # stream.hidden: this layer's inputs in the original basis; q: their axes
            lc = slicing["layers"][i]
            d_in, d_attn, d_out = lc["attention_input"], lc["attention_output"], lc["mlp_output"]
            q_in = q[:, :d_in]
            attn, mlp = layer.self_attn, layer.mlp
            t0 = time.perf_counter()
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                _rotate_inputs(lin, q_in, layer.input_layernorm.weight, rot)
            scale_mlp = layer.post_attention_layernorm.weight
            sliced = SlicedLlamaDecoderLayer(layer, q_in.T.to(dtype).contiguous(), q_in.new_empty(0, dtype=dtype),
                                             hidden, eps)
            inner.layers[i] = sliced
            t_rot += time.perf_counter() - t0
            # Attention half: the residual after it, back in the original basis (o_proj not rotated yet).
            stream.update(lambda x, kw: sliced.attention_block(_in_basis(x, q_in), **kw))  # in place
            q_attn = axes(stream.hidden, d_attn)[:, :d_attn]
            t0 = time.perf_counter()
            sliced.attn_shortcut_Q = torch.nn.Parameter((q_in.T @ q_attn).to(dtype), requires_grad=False)
            _rotate_outputs(attn.o_proj, q_attn, rot)
            for lin in (mlp.gate_proj, mlp.up_proj):
                _rotate_inputs(lin, q_attn, scale_mlp, rot)
            sliced.mlp_shortcut_Q = torch.nn.Parameter(q_attn.T.to(dtype).contiguous(), requires_grad=False)
            t_rot += time.perf_counter() - t0
            # MLP half on the sliced stream: the layer's output, back in the original basis (down_proj not rotated).
            stream.update(lambda h, kw: sliced.mlp_block(_in_basis(h, q_attn)))
            q = axes(stream.hidden, d_out)
            t0 = time.perf_counter()
            sliced.mlp_shortcut_Q = torch.nn.Parameter((q_attn.T @ q[:, :d_out]).to(dtype), requires_grad=False)
            _rotate_outputs(mlp.down_proj, q[:, :d_out], rot)
            t_rot += time.perf_counter() - t0
        # The LM head reads the last layer's stream, through the final norm's scale (in place when not sliced).
        t0 = time.perf_counter()
        d_head = slicing["lm_head_dimension"]
        head = model.lm_head
        w = head.weight.data
        _set_weight(head, _times(w, q[:, :d_head], inner.norm.weight, out=w if d_head == w.shape[1] else None,
                                 dtype=rot))
        inner.norm = SlicedRMSNorm(hidden, eps)
        t_rot += time.perf_counter() - t0
    stream.close()
    cfg.slicing = slicing
    cfg.tie_word_embeddings = False
    model.train(was_training)

    params_after = count_params(model)
    d = slicing["embedding_dimension"]
    shortcuts = sum(l.attn_shortcut_Q.numel() + l.mlp_shortcut_Q.numel() for l in inner.layers)
    per_layer = [{"layer": i, "attention_input": [hidden, lc["attention_input"]],
                  "attention_output": [hidden, lc["attention_output"]], "mlp_output": [hidden, lc["mlp_output"]]}
                 for i, lc in enumerate(slicing["layers"])]
    notes = [f"hidden size {hidden} -> {d} everywhere the residual stream is stored, the embedding included "
             f"([{cfg.vocab_size}, {hidden}] -> [{cfg.vocab_size}, {d}])",
             f"the residual shortcuts add {shortcuts:,} parameters ({depth} layers x 2 rotation matrices)"]
    if d_head == hidden:
        notes.append(f"the last layer's output and the LM head keep the full hidden size {hidden} "
                     "(SliceGPT's default; pruner.slice_head=true slices them too)")
    if tied:
        notes.append(f"the tied embedding / LM head were untied (they carry different rotations): "
                     f"+{cfg.vocab_size * d_head:,} parameters")
    if params_after >= params_before:
        notes.append(f"the sliced model has {params_after - params_before:+,} parameters relative to the dense one: "
                     "on this model the shortcuts and the untied head outweigh what slicing removes")
    return PruneResult(
        params_before=params_before, params_after=params_after,
        compression={"unit": spec.ratio_target, "amount": float(spec.sparsity), "hidden_kept": d / hidden,
                     "params_removed": 1.0 - params_after / params_before},
        ranges={"attention": [0, depth], "mlp": [0, depth]}, layers=per_layer, notes=notes,
        details={"sparsity": float(spec.sparsity), "round_interval": spec.round_interval, "hidden_size": hidden,
                 "sliced_width": d, "lm_head_dimension": d_head, "slice_head": spec.slice_head,
                 "final_orientation": spec.final_orientation, "seed": spec.seed,
                 "center_embeddings": spec.center_embeddings, "rotation_dtype": spec.rotation_dtype, "shortcut_params": shortcuts,
                 "untied_embeddings": tied, "batch_size": spec.batch_size, "offload": stream.offload,
                 "device": str(dev), "calibration": {"samples": int(calibration.shape[0]),
                                                     "tokens": int(calibration.numel())}},
        timings={"embed_s": stream.seconds["embed"], "layers_s": stream.seconds["layers"], "pca_s": t_pca,
                 "rotate_s": t_rot})
