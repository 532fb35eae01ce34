"""benchmarks/zoo.py's figures: the ratios to the teacher's 50-step Euler, the goals, the table (no model runs)."""

import importlib.util
import json
from pathlib import Path

import pytest

ZOO = Path(__file__).resolve().parent.parent / "benchmarks" / "zoo.py"


@pytest.fixture(scope="module")
def zoo():
    spec = importlib.util.spec_from_file_location("zoo_benchmark", ZOO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def eval_report(student: dict, euler50: float) -> dict:
    row = lambda fd: {"fd_test_images": fd, "fd_teacher_fine": fd / 2, "flow_map_error": 0.1}  # noqa: E731
    return {"results": {"student": {str(n): row(v) for n, v in student.items()},
                        "teacher_euler": {"8": row(40.0), "50": row(euler50)},
                        "teacher_heun": {"8": row(50.0), "50": row(euler50 + 1)}}}


def test_summary_ratios_and_goals(zoo):
    s = zoo.summary(eval_report({1: 60.0, 2: 29.0, 4: 26.0, 8: 19.0}, 20.0))
    assert s["teacher_euler_50_fd"] == 20.0
    assert s["ratios"] == {1: 3.0, 2: 1.45, 4: 1.3, 8: 0.95}
    assert s["goals_met"] == {1: True, 2: True, 4: False}  # at most 3x / 1.5x / 1.2x
    assert s["student_fd_teacher_fine"][1] == 30.0
    missing = zoo.summary({"results": {"student": {"1": None}, "teacher_euler": {}}})
    assert missing["ratios"][1] is None and missing["goals_met"][1] is None


def test_table_has_every_teacher_a_row(zoo, tmp_path):
    args = zoo.parse(["--max-steps", "20"])
    assert args.variant == "steps20"
    with pytest.raises(SystemExit):
        zoo.parse(["--set", "lr=1e-4"])  # a setting changed needs a variant name of its own
    teacher = {"results": {"teacher_euler": {"50": {"fd_test_images": 20.0, "flow_map_error": 0.001}},
                           "scheduler_ddim": {"50": {"fd_test_images": 18.5, "flow_map_error": 0.002}}}}
    (tmp_path / "teacher-vpred.json").write_text(json.dumps(teacher))
    (tmp_path / "teacher-dit.json").write_text(json.dumps(teacher))
    report = eval_report({1: 60.0, 2: 29.0, 4: 26.0, 8: 19.0}, 20.0)
    for variant in ("default", "dm"):
        row = {"teacher": "vpred", "variant": variant, "run": {"config": {"max_steps": 3000}},
               "summary": json.loads(json.dumps(zoo.summary(report)))}  # as read back from the row file
        (tmp_path / f"vpred{'' if variant == 'default' else '--' + variant}.json").write_text(json.dumps(row))
    text = zoo.write_table(tmp_path).read_text()
    lines = [line for line in text.splitlines() if line.startswith("| vpred | default")]
    assert lines == ["| vpred | default | 3000 | 60.0 | 29.0 | 26.0 | 19.0 | 20.0 | **3.00x** | **1.45x** | 1.30x "
                     "| scheduler_ddim 18.5 |"]
    assert "| vpred | dm |" in text and "| dit | (not distilled yet) |" in text
    assert "| dit | scheduler_ddim | " in text
