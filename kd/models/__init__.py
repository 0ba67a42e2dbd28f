"""Teacher and student models: loading, building, vocabulary checks, student init from teacher layers."""
from kd.models.layer_init import copy_teacher_layers, student_config_from_teacher
from kd.models.loading import load_student, load_teacher, load_tokenizer, source_config
from kd.models.vocab import check_same_tokenizer, max_positions, shared_vocab_size
from kd.models.zero3 import zero3_construction

__all__ = [
    "check_same_tokenizer",
    "copy_teacher_layers",
    "load_student",
    "load_teacher",
    "load_tokenizer",
    "max_positions",
    "shared_vocab_size",
    "source_config",
    "student_config_from_teacher",
    "zero3_construction",
]
