"""tests/cli_runner.py: a command forked from the preloaded server answers as a fresh
`python -m recsys.cli` does (status, stdout, stderr), in the caller's working directory and
environment of the moment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.cli_runner import run_cli


def fresh(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "recsys.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args", [("--help",), ("data", "synth", "--help"), ("no-such-command",),
                                  ("train", "--config", "/no/such/config.yaml", "--data", "/x", "--out", "/y")])
def test_a_forked_command_answers_as_a_fresh_interpreter(args):
    forked, new = run_cli(*args), fresh(*args)
    assert (forked.returncode, forked.stdout, forked.stderr) == (new.returncode, new.stdout, new.stderr)
    assert forked.stdout or forked.stderr  # something was compared


def test_the_command_runs_in_the_callers_directory_and_environment(tmp_path, monkeypatch):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    monkeypatch.chdir(tmp_path)
    r = run_cli("train", "--config", "bad.yaml", "--data", "d", "--out", "o")
    assert r.returncode == 2 and "bad.yaml" in r.stderr and "not found" not in r.stderr, r.stderr
    # the environment of the call, not of the fork server's start: no presets in an empty config dir
    monkeypatch.setenv("RECSYS_CONFIG_DIR", str(tmp_path))
    with_env = run_cli("data", "synth", "--help")
    monkeypatch.delenv("RECSYS_CONFIG_DIR")
    assert with_env.stdout != run_cli("data", "synth", "--help").stdout
    assert os.getcwd() == str(tmp_path)
