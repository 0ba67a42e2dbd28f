"""Dynamic logit fusion (Fan et al., NeurIPS 2024, arXiv 2406.15480): a large base model steered, position by position,
by small task experts that are fine-tunes of one small base.

    grid.py     the weight grid and the candidate weight vectors of each search mode, in tie-breaking order (no torch)
    solver.py   the batched per-position solver: weights a*, fused logits, objective, selected expert
    stats.py    per-batch sums of the solver's outputs (for logging), and their summary after an all-reduce

kd.teachers.fusion.FusionTeacher runs the models and hands the fused logits to the trainer as a teacher signal.
This package imports no torch at import time (the recipe schema reads kd.fusion.grid).
"""
