"""Layer replacement: hybrids of a base model and a donor model, and a search over which layers to swap.

- ``hybrid.py``: donor decoder layers read lazily from safetensors; swap them into a base model by reference.
- ``fitness.py``: how good a hybrid is, measured on calibration tokens (KL to the donor, perplexity), with the
  base's hidden states cached so a candidate only runs the layers from its first swapped one.

The search over layer sets uses the generic engine in ``core/search.py`` (spaces, strategies, cache, resume),
shared with the pruners' searched allocation; the fitness is passed in.

Plain arguments only; imports ``core``, never a sibling package.
"""
