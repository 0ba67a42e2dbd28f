"""The offline teacher: `kd precompute` stores a teacher's top-k log-probs per token once (kd.store.precompute), and
runs with ``teacher.store`` train from it without the teacher in memory (kd.teachers.store). kd.store.format is the
on-disk form, kd.store.identity what a store was computed from and the check that a run fits it."""
