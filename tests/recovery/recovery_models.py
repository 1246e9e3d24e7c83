"""Tiny random models of every layout recovery fine-tunes: a Llama, a pruned Llama (per-layer widths, removed
sub-blocks, added output biases), a SliceGPT-sliced Llama, a Llama/Llamba hybrid; and a memorisable text."""

from __future__ import annotations

from pathlib import Path

import torch

from llamba_helpers import randomize, tiny_hybrid

ARCHS = ("llama", "pruned", "sliced", "hybrid")
TEXT = ("The quick brown fox jumps over the lazy dog while the patient gardener waters seven green tomato plants "
        "beside the old stone wall near the river.")


def tiny_llama(seed: int = 0):
    from core.models.load import build_tiny

    return build_tiny(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2, seed=seed)


def tiny_pruned(seed: int = 0):
    """Layer 0: attention removed; 1: half the KV groups, an o_proj bias (FLAP); 2: MLP removed; 3: a quarter of the
    MLP channels and a down_proj bias."""
    from core.models.modeling_pruned import PrunedLlamaConfig, PrunedLlamaForCausalLM
    from core.models.load import byte_tokenizer
    from core.models.ref import tiny_config

    tok = byte_tokenizer()
    lcs = [{"num_attention_heads": 0, "num_key_value_heads": 0, "intermediate_size": 96},
           {"num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 64, "o_proj_bias": True},
           {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 0},
           {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 32, "down_proj_bias": True}]
    cfg = PrunedLlamaConfig(layer_configs=lcs, **tiny_config(4, 64, 128, 8, 2, len(tok)),
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return randomize(PrunedLlamaForCausalLM(cfg), seed).eval(), tok


def tiny_sliced(seed: int = 0):
    """Two layers whose residual stream narrows 64 -> 48 -> 44 -> 40 (SliceGPT's shortcut matrices in between)."""
    from core.models.modeling_sliced import SlicedLlamaConfig, SlicedLlamaForCausalLM
    from core.models.load import byte_tokenizer
    from core.models.ref import tiny_config

    tok = byte_tokenizer()
    slicing = {"embedding_dimension": 48, "lm_head_dimension": 40,
               "layers": [{"attention_input": 48, "attention_output": 48, "mlp_output": 44},
                          {"attention_input": 44, "attention_output": 40, "mlp_output": 40}]}
    cfg = SlicedLlamaConfig(slicing=slicing, **tiny_config(2, 64, 128, 8, 2, len(tok)),
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return randomize(SlicedLlamaForCausalLM(cfg), seed).eval(), tok


def tiny_hybrid_model(seed: int = 0):
    return tiny_hybrid(["attention", "mamba2", "attention"], seed=seed)


def build(arch: str, seed: int = 0):
    return {"llama": tiny_llama, "pruned": tiny_pruned, "sliced": tiny_sliced, "hybrid": tiny_hybrid_model}[arch](seed)


def memorisable_file(path: Path, paragraphs: int = 60) -> Path:
    """A text file of one sentence repeated as ``paragraphs`` paragraphs (a tiny model can learn it in a few steps)."""
    path.write_text("\n\n".join([TEXT] * paragraphs) + "\n")
    return path


def varied_file(path: Path, paragraphs: int = 80, seed: int = 0) -> Path:
    """Paragraphs of shuffled words (distinct, so the held-out split and overlap checks have something to work on)."""
    import random

    words = TEXT.rstrip(".").split()
    rng = random.Random(seed)
    paras = []
    for i in range(paragraphs):
        rng.shuffle(words)
        paras.append(f"Paragraph {i}: " + " ".join(words) + ".")
    path.write_text("\n\n".join(paras) + "\n")
    return path


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def plain_transformers_run(out: Path, x: torch.Tensor, ref: torch.Tensor, tmp_path: Path) -> tuple[str, float]:
    """Load checkpoint ``out`` with plain transformers in a process where prunelab cannot be imported, run it on
    ``x``; returns (its model class name, max |logits - ref|)."""
    import os
    import subprocess
    import sys

    torch.save(x, tmp_path / "x.pt")
    torch.save(ref, tmp_path / "ref.pt")
    script = f"""
import sys
for name in ("core", "pruning", "analysis", "replacement", "recovery"):
    sys.modules[name] = None  # prunelab is not importable here
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
print("RESULT", type(m).__name__, (m(x).logits - ref).abs().max().item())
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1].split()
    return line[1], float(line[2])
