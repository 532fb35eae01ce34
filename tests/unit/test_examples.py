"""The example config files resolve into valid runs (a typo in one would otherwise reach a user first)."""

from pathlib import Path

import pytest

from ttfm_distill.config import RunConfig, load_config_file

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))


def test_there_are_example_configs():
    assert any(p.name == "dm-stage.toml" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_a_valid_run(path):
    values = load_config_file(path)
    cfg = RunConfig.from_dict(values).validate()  # types, ranges and cross-setting rules, as `run` checks them
    for key, value in values.items():
        assert getattr(cfg, key) == value


def test_dm_stage_needs_an_earlier_run_to_start_from(tmp_path):
    values = load_config_file(next(p for p in EXAMPLES if p.name == "dm-stage.toml"))
    assert values["dm_weight"] > 0 and values["max_steps"] < RunConfig().max_steps
    cfg = RunConfig.from_dict({**values, "init_from": str(tmp_path)}).validate()  # an existing folder is accepted
    assert cfg.init_from == str(tmp_path)
