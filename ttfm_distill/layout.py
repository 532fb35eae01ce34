"""Where things sit in an export folder: the pipeline folder and its ``flow_map/`` student component.

Read by the exporter, the model card and every loader; it imports only the student's format, so the
modules that write and describe an export do not import each other.
"""

from __future__ import annotations

from pathlib import Path

from .student import COMPONENT, CONFIG_NAME, StudentLoadError


def resolve_student_folder(path: str | Path) -> Path:
    """Accept an export folder or a run folder holding ``student/``."""
    from .fileio import recover_dir

    path = Path(path)
    recover_dir(path)
    recover_dir(path / "student")
    for cand in (path, path / "student"):
        if (cand / "model_index.json").exists() or (cand / CONFIG_NAME).exists():
            return cand
    if not path.exists():
        raise StudentLoadError(f"{path} does not exist; pass a run folder or an exported student folder")
    raise StudentLoadError(f"{path} is not an exported student (no model_index.json or ttfm_config.json); "
                           "pass the folder 'ttfm-distill run' wrote")


def student_folder(path: str | Path) -> Path:
    """The folder holding the student's own files: ``flow_map/`` of a pipeline export, else the folder itself."""
    folder = resolve_student_folder(path)
    return folder / COMPONENT if (folder / "model_index.json").exists() else folder
