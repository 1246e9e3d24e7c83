"""Greedy generation smoke test on a fixed chat prompt (KV cache on)."""

from __future__ import annotations

import time

import torch


@torch.no_grad()
def generate_sample(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 16) -> dict:
    device = next(model.parameters()).device
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    dt = time.perf_counter() - t0
    new = out[0, enc["input_ids"].shape[1]:]
    return {"prompt": prompt, "output": tokenizer.decode(new, skip_special_tokens=True).strip(),
            "new_tokens": int(new.numel()), "seconds": dt, "greedy": True}
