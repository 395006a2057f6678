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


def test_compile_takes_the_cluster_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out), "--image", "registry.example/kiln:abc123", "--gpus", "1",
                 "--git-secret", "kiln-git", "--resources", "train=8,16,16Gi,32Gi", "--train-timeout", "600",
                 "--retries", "5"]) == 0
    assert f"compiled {out}" in capsys.readouterr().out
    spec, platform = yaml.safe_load_all(out.read_text())
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["image"] == "registry.example/kiln:abc123"
    assert (train["resources"]["resourceCpuLimit"], train["resources"]["resourceMemoryLimit"]) == ("16", "32Gi")
    assert spec["root"]["dag"]["tasks"]["ingest"]["retryPolicy"]["maxRetryCount"] == 5
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-train"]["activeDeadlineSeconds"] == "600"
    assert k8s["exec-resolve"]["secretAsEnv"][0]["secretName"] == "kiln-git"


def test_compile_refuses_a_malformed_resources_option(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--resources wants STEP=CPU_REQ,CPU_LIM,MEM_REQ,MEM_LIM"):
        main(["compile", "--output", str(tmp_path / "p.yaml"), "--resources", "trian=1,2,1Gi,2Gi"])


def test_the_server_and_its_demo_page_import_no_matplotlib_and_jinja2_is_a_serve_dependency() -> None:
    """The serve image installs only the `serve` extra: the demo page must not need the plots' stack."""
    import subprocess
    import sys
    import tomllib

    code = "import sys, kiln.serving.server, kiln.html; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    extras = tomllib.loads((find_repo_root(Path(__file__).parent) / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert "jinja2==3.1.6" in extras["serve"] and "jinja2==3.1.6" in extras["serve-gpu"]


def test_a_usage_mistake_is_one_line_and_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["models", "promote"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kiln models: ") and "--help" in err
