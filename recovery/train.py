"""The LoRA training loop: AdamW on the adapters, held-out perplexity, early stopping, resumable state.

    result = train(peft_model, rows, heldout, spec, total_steps=200, pad_id=tok.pad_token_id,
                   state_dir=run_dir / "recovery" / "state", fingerprint={...})

One optimizer step = ``grad_accum`` micro-batches of ``micro_batch`` rows; the loss is the mean next-token
cross-entropy over the step's target tokens (prompt and padding carry none). Held-out perplexity is measured
before the first step, every ``eval_every`` steps and after the last, on the same windows every time (the
protocol of :mod:`analysis.perplexity`: each window scored on its last ``seq_len - 1`` tokens).

**Resume.** Every ``save_every`` steps and at the end, the state is written atomically to
``state_dir/step-<n>/`` (the adapters and early stopping's best adapters as safetensors; optimizer, scheduler and
RNG states in ``trainer.pt``, read back with ``torch.load(weights_only=True)``; history and the configuration's
fingerprint in ``meta.json``), then ``state_dir/latest.json`` is pointed at it and older states are removed.
The rows are a pure function of the configuration, so a run resumed from step n reads row ``n x rows_per_step``
next, with the same optimizer moments, learning rate and dropout RNG: it ends with the adapters an
uninterrupted run ends with. A state saved by another configuration is refused with one line naming what differs.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from tqdm.auto import tqdm

from core.run.errors import ConfigError
from core.run.io import atomic_dir, atomic_write_json
from recovery.data import Rows, collate
from recovery.lora import LoRASpec, resolve_precision, trainable_parameters

log = logging.getLogger(__name__)

LATEST = "latest.json"


@dataclass
class History:
    """Everything of a run so far that the adapters alone do not hold (saved with the state)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)  # mean training loss of each step
    evals: list[dict] = field(default_factory=list)  # {"step", "tokens", "train_s", "ppl"}
    tokens: int = 0  # input tokens read (padding excluded)
    target_tokens: int = 0
    train_s: float = 0.0  # seconds in training steps (evaluations and saves excluded)
    eval_s: float = 0.0
    best_ppl: Optional[float] = None
    best_step: Optional[int] = None
    bad_evals: int = 0
    stopped_early: bool = False
    resumed_from: list[int] = field(default_factory=list)  # steps this run was resumed at


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken (all runs of a resumed training together)
    total_steps: int
    history: History
    adapter_step: int  # the step whose adapters the model holds (the best one after early stopping)
    precision: str

    @property
    def final_loss(self) -> Optional[float]:
        """Mean training loss over the last (up to) 10 steps."""
        tail = self.history.losses[-10:]
        return sum(tail) / len(tail) if tail else None

    @property
    def tokens_per_s(self) -> Optional[float]:
        h = self.history
        return h.tokens / h.train_s if h.train_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        h = self.history
        first = h.evals[0]["ppl"] if h.evals else None
        return {"steps": self.steps, "total_steps": self.total_steps, "tokens": h.tokens,
                "target_tokens": h.target_tokens, "final_loss": self.final_loss,
                "last_loss": h.losses[-1] if h.losses else None, "train_s": round(h.train_s, 3),
                "eval_s": round(h.eval_s, 3), "tokens_per_s": self.tokens_per_s, "precision": self.precision,
                "heldout_ppl_before": first, "heldout_ppl_after": self._final_ppl(),
                "best_step": h.best_step, "adapter_step": self.adapter_step, "stopped_early": h.stopped_early,
                "resumed_from": h.resumed_from}

    def _final_ppl(self) -> Optional[float]:
        for e in reversed(self.history.evals):
            if e["step"] == self.adapter_step:
                return e["ppl"]
        return None


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate after ``step`` steps: linear warm-up, then cosine or linear decay to 0, or
    constant."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return f


def _device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


def _nll(model: Any, ids: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor],
         autocast: Any) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens of one micro-batch."""
    dev = _device(model)
    with autocast():
        logits = model(input_ids=ids.to(dev), attention_mask=None if mask is None else mask.to(dev),
                       use_cache=False).logits
    logits = logits[:, :-1].float()  # [b, t - 1, vocab]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
                           ignore_index=-100, reduction="sum")


@torch.no_grad()
def heldout_ppl(model: Any, rows: Rows, batch: int, pad_id: int, autocast: Any = None) -> float:
    """Perplexity of ``model`` on the held-out rows (dropout off); ``inf`` when it is not finite."""
    autocast = autocast or nullcontext
    training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in range(0, len(rows.ids), batch):
            ids, labels, mask = collate(rows, i, batch, pad_id)
            nll += _nll(model, ids, labels, mask, autocast).item()
            count += int((labels[:, 1:] != -100).sum())
    finally:
        model.train(training)
    value = math.exp(nll / count) if count and math.isfinite(nll / count) and nll / count < 700 else float("inf")
    return value


def _adapter_state(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in params.items()}


def _load_adapters(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: Path) -> None:
    if set(state) != set(params):
        raise ConfigError(f"recovery.resume: the adapters in {where} do not match this model's ({len(state)} saved, "
                          f"{len(params)} here): another model or another recovery.targets")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))


def latest_state(state_dir: Path) -> Optional[Path]:
    """The newest complete state in ``state_dir`` (``latest.json``'s), or None."""
    pointer = state_dir / LATEST
    if pointer.is_file():
        try:
            path = state_dir / json.loads(pointer.read_text())["dir"]
        except (OSError, ValueError, KeyError):
            path = None
        if path is not None and (path / "meta.json").is_file():
            return path
    done = sorted(p for p in state_dir.glob("step-*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def _diff(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """``key: saved -> now`` for every leaf that differs (nested dicts as dotted keys)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now), key=str)
                for d in _diff(saved.get(k), now.get(k), f"{prefix}{k}.")]
    return [] if saved == now else [f"{prefix.rstrip('.')}: {saved!r} -> {now!r}"]


def save_state(state_dir: Path, history: History, params: dict[str, torch.Tensor], opt: Any, sched: Any,
               best: Optional[dict[str, torch.Tensor]], fingerprint: dict) -> Path:
    """Write the state of ``history.step`` atomically and point ``latest.json`` at it; older states are removed."""
    name = f"step-{history.step:08d}"
    target = state_dir / name
    if not target.exists():
        # Serialised in memory, then written as plain bytes: a full disk is an OSError (ENOSPC), which atomic_dir turns
        # into one RunDirError line, never torch's zip writer's "unexpected pos" or a safetensors IoError.
        buf = io.BytesIO()
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, buf)
        files = {"adapter.safetensors": save_tensors(_adapter_state(params)), "trainer.pt": buf.getvalue()}
        if best is not None:
            files["best.safetensors"] = save_tensors(best)
        with atomic_dir(target) as tmp:
            for fname, data in files.items():
                (tmp / fname).write_bytes(data)
            atomic_write_json(tmp / "meta.json", {"fingerprint": fingerprint, "history": asdict(history)})
    atomic_write_json(state_dir / LATEST, {"step": history.step, "dir": name})
    for old in state_dir.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _state_path(where: Path) -> Optional[Path]:
    return where if (where / "meta.json").is_file() else latest_state(where)


def _refuse_other(path: Path, saved: dict, now: dict) -> None:
    diff = _diff(saved, json.loads(json.dumps(now)))  # compare as JSON (tuples are lists there)
    if diff:
        raise ConfigError(f"recovery.resume: the state in {path} was saved by another configuration "
                          f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}): resume with the same settings "
                          "or start afresh (recovery.resume=false)")


def check_state(where: Path, spec: LoRASpec, total_steps: Optional[int] = None) -> Path:
    """The state dir to resume from in ``where``, checked against these options before any work is done (the model's
    identity is checked when the state is loaded); ``total_steps`` None: the options only (before the text is read).
    Its ``trainer.pt`` is read once with ``weights_only=True``: a file holding code or objects is refused in one line,
    before anything is copied into the new run."""
    path = _state_path(where)
    if path is None:
        raise ConfigError(f"recovery.resume: no saved state in {where}")
    try:
        saved = json.loads((path / "meta.json").read_text()).get("fingerprint") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"recovery.resume: {path / 'meta.json'} is unreadable ({type(e).__name__}: "
                          f"{str(e)[:200]}); start afresh (recovery.resume=false)") from None
    now: dict[str, Any] = {"spec": spec.fingerprint()}
    if total_steps is not None:
        now["total_steps"] = total_steps
    _refuse_other(path, {k: saved.get(k) for k in now}, now)
    _read_trainer(path)
    return path


def _read_trainer(path: Path) -> dict:
    """``trainer.pt`` read as plain tensors and containers only; anything else is one ConfigError line, and nothing in
    the file runs (never a hint to load it with ``weights_only=False``)."""
    f = path / "trainer.pt"
    try:
        trainer = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ... : one line
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            why = f"it asks to call or build {found.group(1)}"
        elif "Weights only load failed" in str(e):
            why = "it holds objects other than tensors"
        else:
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else 'unreadable'}"
        raise ConfigError(f"recovery.resume: {f} is not a plain training state ({why}): refused without running it; "
                          "start afresh (recovery.resume=false)") from None
    if not isinstance(trainer, dict) or not {"optimizer", "scheduler", "rng"} <= set(trainer):
        raise ConfigError(f"recovery.resume: {f} is not a training state (no optimizer, scheduler and rng entries); "
                          "start afresh (recovery.resume=false)")
    return trainer


def load_state(path: Path, params: dict[str, torch.Tensor], opt: Any, sched: Any,
               fingerprint: dict) -> tuple[History, Optional[dict[str, torch.Tensor]]]:
    """Restore adapters, optimizer, scheduler and RNG from a state dir; ConfigError if another configuration saved
    it."""
    meta = json.loads((path / "meta.json").read_text())
    _refuse_other(path, meta.get("fingerprint") or {}, fingerprint)
    _load_adapters(params, load_file(str(path / "adapter.safetensors")), path)
    trainer = _read_trainer(path)
    opt.load_state_dict(trainer["optimizer"])
    sched.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"])
    if trainer.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["cuda_rng"])
    history = History(**meta["history"])
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else None
    return history, best


def _checkpointing(base: Any, on: bool) -> None:
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant (inputs need no grad), on or off;
    transformers >= 5 names it activation checkpointing, older versions gradient checkpointing."""
    if hasattr(base, "activation_checkpointing_enable"):
        if on:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.activation_checkpointing_disable()
    elif on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def is_checkpointing(base: Any) -> bool:
    """Whether activation checkpointing is on (either transformers name)."""
    if hasattr(type(base), "is_activation_checkpointing"):
        return bool(base.is_activation_checkpointing)
    return bool(getattr(base, "is_gradient_checkpointing", False))


def train(model: Any, rows: Rows, heldout: Optional[Rows], spec: LoRASpec, *, total_steps: int, pad_id: int,
          state_dir: Optional[Path] = None, resume_from: Optional[Path] = None,
          fingerprint: Optional[dict] = None, progress: bool = True,
          on_step: Optional[Callable[[History], None]] = None,
          on_eval: Optional[Callable[[dict], None]] = None) -> TrainResult:
    """Train the adapters of ``model`` (a peft model) for ``total_steps`` optimizer steps over ``rows``.

    ``rows`` must hold ``total_steps x spec.rows_per_step`` rows. ``resume_from``: a state dir (or a dir holding
    ``latest.json``) to continue from. ``on_step(history)`` runs after each step (and its state save),
    ``on_eval(entry)`` after each held-out evaluation.
    """
    need = total_steps * spec.rows_per_step
    if len(rows.ids) < need:
        raise ValueError(f"{len(rows.ids)} rows for {total_steps} steps of {spec.rows_per_step} rows")
    dev = _device(model)
    precision = resolve_precision(spec.precision, dev)
    autocast = (lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else nullcontext
    fingerprint = {**(fingerprint or {}), "spec": spec.fingerprint(), "total_steps": total_steps}
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(list(params.values()), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec.schedule, spec.warmup_steps, total_steps))
    history, best = History(), None
    if resume_from is not None:
        path = _state_path(resume_from)
        if path is None:
            raise ConfigError(f"recovery.resume: no saved state in {resume_from}")
        history, best = load_state(path, params, opt, sched, fingerprint)
        history.resumed_from.append(history.step)
        log.info("recovery: resumed from step %d of %d (%s)", history.step, total_steps, path)
    else:
        torch.manual_seed(spec.seed)

    def evaluate() -> None:
        if heldout is None:
            return
        t0 = time.perf_counter()
        ppl = heldout_ppl(model, heldout, spec.micro_batch, pad_id, autocast)
        history.eval_s += time.perf_counter() - t0
        entry = {"step": history.step, "tokens": history.tokens, "train_s": round(history.train_s, 3), "ppl": ppl}
        history.evals.append(entry)
        nonlocal best
        if spec.patience is not None:
            if history.best_ppl is None or ppl < history.best_ppl:
                history.best_ppl, history.best_step, history.bad_evals = ppl, history.step, 0
                best = _adapter_state(params) if spec.restore_best else None
            else:
                history.bad_evals += 1
                history.stopped_early = history.bad_evals >= spec.patience
        log.info("recovery step %d/%d: held-out perplexity %.3f%s", history.step, total_steps, ppl,
                 f" (best {history.best_ppl:.3f} at step {history.best_step})" if history.best_ppl else "")
        if on_eval is not None:
            on_eval(entry)

    def save() -> None:
        if state_dir is not None:
            save_state(state_dir, history, params, opt, sched, best, fingerprint)

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if spec.gradient_checkpointing:
        _checkpointing(base, True)
    model.train()
    if not history.evals:
        evaluate()  # the starting point of the curve: the model before recovery
    bar = tqdm(total=total_steps, initial=history.step, desc="LoRA recovery", unit="step", disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    try:
        while history.step < total_steps and not history.stopped_early:
            t0 = time.perf_counter()
            first = history.step * spec.rows_per_step
            batches = [collate(rows, first + j * spec.micro_batch, spec.micro_batch, pad_id)
                       for j in range(spec.grad_accum)]
            targets = sum(int((labels[:, 1:] != -100).sum()) for _, labels, _ in batches)
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for ids, labels, mask in batches:
                loss = _nll(model, ids, labels, mask, autocast) / max(1, targets)
                loss.backward()
                loss_sum += loss.item()
                history.tokens += int(ids.numel() if mask is None else mask.sum())
            if spec.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(params.values()), spec.max_grad_norm)
            opt.step()
            sched.step()
            history.step += 1
            history.target_tokens += targets
            history.losses.append(loss_sum)
            history.train_s += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{history.tokens / max(history.train_s, 1e-9):.0f}")
            last = history.step == total_steps
            if last or (spec.eval_every and history.step % spec.eval_every == 0):
                evaluate()
            if last or history.stopped_early or (spec.save_every and history.step % spec.save_every == 0):
                save()
            if on_step is not None:
                on_step(history)
    finally:
        bar.close()
        if spec.gradient_checkpointing:
            _checkpointing(base, False)
        model.eval()
    if history.stopped_early:
        log.info("recovery: early stop at step %d (no better held-out perplexity in %d evaluations)", history.step,
                 spec.patience)
    adapter_step = history.step
    if best is not None and history.best_step is not None and history.best_step != history.step:
        _load_adapters(params, best, Path("early stopping's best state"))
        adapter_step = history.best_step
    return TrainResult(history.step, total_steps, history, adapter_step, precision)
