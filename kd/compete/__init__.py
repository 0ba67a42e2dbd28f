"""Competitive distillation (Lion, Jiang et al. 2023; CoMD, Li et al. 2023): rounds of imitation, discrimination and
generation in which the instruction pool grows where the student is weakest.

Pure pieces (no model): rouge.py (ROUGE-L F), filters.py (candidate filters), judges.py (assessors), pool.py (the
instruction pool), augment.py (the augmentor's prompt). With models: backend.py (batched, rank-split generation and
log-probs on kd's engines), state.py (the persistent round state), rounds.py (the loop), launch.py / cli.py
(`kd compete RECIPE`).
"""
