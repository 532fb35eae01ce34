"""Bad input through the real entry point: one line on stderr, a non-zero exit, nothing half-written."""

import errno

import pytest


def test_disk_full_is_one_line(capsys):
    import typer

    from ttfm_distill import cli as cli_mod

    def body():
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/step-1/student.safetensors")

    with pytest.raises(typer.Exit) as e:
        cli_mod._guard(body)
    assert e.value.exit_code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full" in err[0] and "student.safetensors" in err[0]
