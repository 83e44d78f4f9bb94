"""Teacher engines (transformers, vLLM) and the teacher service."""

from gkd.teacher.types import TeacherOutput, check_sequences

__all__ = ["TeacherOutput", "check_sequences"]
