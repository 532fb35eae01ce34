"""Run state: what a run learns while it runs and a resumed run must keep, as opposed to its settings.

Two facts: the key of the teacher's weights (known once they load: a teacher replaced at the same path never
resumes a run, nor reuses its pool) and the step count a time budget fitted (known after the lr warm-up's pace:
a resumed run trains to the same count and replays the same schedule whatever its own pace). They are saved in
the run folder's ``run_state.json`` beside ``config.json`` (the settings, which never change after the run
resolves). Folders written before this file existed kept both in ``config.json``; they are read from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

STATE_FILE = "run_state.json"
#: the run state that folders of earlier versions kept among the settings in config.json
LEGACY_KEYS = ("fitted_steps", "teacher_fingerprint")


@dataclass
class RunState:
    """The run's step count and teacher key. ``max_steps`` is the setting; ``fitted_steps``, where a time budget
    fixed the count (at most ``max_steps``), replaces it; ``teacher_fingerprint`` is filled in once the teacher
    loads. Mutable on purpose: the trainer fills both in once, and whatever reads :attr:`total_steps` later (the
    lr schedule, the distribution-matching stage, the log) sees the count the run trains."""

    max_steps: int
    fitted_steps: int | None = None
    teacher_fingerprint: str | None = None

    @property
    def total_steps(self) -> int:
        """The steps this run trains: ``fitted_steps`` where a time budget fixed them, else ``max_steps``."""
        return int(self.fitted_steps) if self.fitted_steps is not None else int(self.max_steps)

    def command_settings(self, settings: dict) -> dict:
        """The settings (``RunConfig.to_dict()``) of a command that repeats this run: where a time budget fitted
        the step count, that count as ``max_steps`` and no budget (the model card's command)."""
        if self.fitted_steps is None:
            return dict(settings)
        return {**settings, "max_steps": int(self.fitted_steps), "time_budget": None}

    def to_dict(self) -> dict:
        return {"fitted_steps": self.fitted_steps, "teacher_fingerprint": self.teacher_fingerprint}

    def save(self, out: Path) -> None:
        from .fileio import write_json

        write_json(Path(out) / STATE_FILE, self.to_dict())

    @classmethod
    def read(cls, out: Path, saved: dict | None) -> dict:
        """The saved state of run folder ``out`` as a dict (``run_state.json``, or for a folder of an earlier
        version the same keys of its config.json ``saved``); empty for a new run. A damaged file raises
        ``ConfigError`` naming it."""
        path = Path(out) / STATE_FILE
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                data = None
            if not isinstance(data, dict) or not set(data) <= set(LEGACY_KEYS) or not _valid(data):
                raise ConfigError(f"{path} is damaged; pass --overwrite to start the run over, or another --output")
            return data
        return {k: saved[k] for k in LEGACY_KEYS if saved and saved.get(k) is not None}

    @classmethod
    def resumed(cls, max_steps: int, out: Path, saved: dict | None) -> "RunState":
        """The state a run of ``max_steps`` starts from in ``out`` (``saved``: its config.json, None for a new run).
        A resumed run keeps the step count its time budget fitted unless the command changes ``max_steps``: then
        it trains to the new ``max_steps`` (its budget was spent on the first fit)."""
        if saved is None:
            return cls(int(max_steps))
        data = cls.read(out, saved)
        fitted = data.get("fitted_steps")
        keep = fitted is not None and saved.get("max_steps") == max_steps and 1 <= int(fitted) <= int(max_steps)
        return cls(int(max_steps), int(fitted) if keep else None, data.get("teacher_fingerprint"))


def _valid(data: dict) -> bool:
    fitted, key = data.get("fitted_steps"), data.get("teacher_fingerprint")
    return (fitted is None or (isinstance(fitted, int) and not isinstance(fitted, bool) and fitted >= 1)) and \
        (key is None or isinstance(key, str))
