"""The `kiln` command line dispatches to the stages and hands sub-commands their own options."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kiln.cli import find_repo_root, main


def test_data_bootstrap_writes_the_dataset(tmp_path: Path) -> None:
    assert main(["data", "bootstrap", "--root", str(tmp_path / "d")]) == 0
    labels = pd.read_csv(tmp_path / "d" / "labels.csv", dtype={"id": str})
    assert len(labels) == 5000 and len(list((tmp_path / "d" / "images").glob("*.png"))) == 5000


@pytest.mark.parametrize("command", ["serve", "run"])
def test_pass_through_commands_get_their_options(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"kiln {command}" in capsys.readouterr().out


def test_outside_a_checkout_pipeline_commands_say_why(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no kiln repository"):
        find_repo_root(tmp_path)
