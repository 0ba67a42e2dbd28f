"""Where the teacher signal comes from. The trainer only sees `TeacherSource`; one frozen model is `ModelTeacher`,
and a fused multi-teacher or an offline top-k store implement the same protocol."""
from kd.teachers.base import TeacherOutput, TeacherSource
from kd.teachers.model import ModelTeacher

__all__ = ["ModelTeacher", "TeacherOutput", "TeacherSource"]
