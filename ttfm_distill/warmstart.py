"""Start a run's student from an earlier run's student (``init_from``) instead of from the teacher."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError


def init_student_from(student, source: str | Path) -> None:
    """Copy the weights of the student exported in ``source`` (a run folder or an export) into ``student``.

    Both must be the same kind of student on the same network; a mismatch is refused in one line.
    """
    from .layout import student_folder
    from .student import StudentLoadError, load_student

    try:
        earlier = load_student(student_folder(source))
    except StudentLoadError as e:
        raise ConfigError(f"init_from: {e}") from None
    mine, theirs = student.state_dict(), earlier.state_dict()
    if set(mine) != set(theirs) or any(mine[k].shape != theirs[k].shape for k in mine):
        raise ConfigError(f"init_from: the student in {source} is not this run's kind of student (other tensors or "
                          "shapes); pass a run of the same teacher and student settings")
    student.load_state_dict(theirs, strict=True)
