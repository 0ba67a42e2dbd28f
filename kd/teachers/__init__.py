"""Where the teacher signal comes from. The trainer only sees `TeacherSource` (built from the recipe by
`build_teacher_source`); one frozen model is `ModelTeacher`, and a fused multi-teacher or an offline top-k store
implement the same protocol."""
from kd.teachers.base import NO_TEACHER, TeacherInfo, TeacherOutput, TeacherRequest, TeacherSource
from kd.teachers.factory import build_teacher_source
from kd.teachers.model import ModelTeacher

__all__ = ["NO_TEACHER", "ModelTeacher", "TeacherInfo", "TeacherOutput", "TeacherRequest", "TeacherSource",
           "build_teacher_source"]
