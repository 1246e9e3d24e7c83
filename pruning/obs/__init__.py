"""The compensated structured pruner (``pruner=obs``; conf/pruner/obs.yaml names pruning.obs.pruner.StructuredOBS).

    pruner.py    StructuredOBS: the options and their checks, the budget, the run
    fit.py       one projection's OBS selection, least-squares compensation and held-out guard (FitOptions in),
                 and the layer-by-layer pass that applies them
    allocate.py  uniform / depth / flap allocation of the MLP channels over the layers
    search.py    allocation=search: per-layer widths searched with core.search, each fitted by fit.py

Imports among them run one way: fit and allocate import neither of the others, search imports fit and allocate,
and pruner imports all three (inside ``__call__``: its top imports no torch, for config validation). Below them:
pruning.compensate (the numeric kernel) and pruning.stats (FLAP's statistics).
"""
