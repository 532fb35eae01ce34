"""Real faults: SIGKILL at random moments of checkpoint/export writes, and a really full disk."""

import pytest


def test_kill_between_the_two_renames_is_recovered(tmp_path):
    """The one window where the export is not at its path: moved aside, new one not yet in place."""
    from ttfm_distill.export import StudentLoadError, resolve_student_folder

    (tmp_path / ".student.old").mkdir()
    (tmp_path / ".student.old" / "ttfm_config.json").write_text("{}")
    assert resolve_student_folder(tmp_path) == tmp_path / "student"
    with pytest.raises(StudentLoadError):
        resolve_student_folder(tmp_path / "elsewhere")
