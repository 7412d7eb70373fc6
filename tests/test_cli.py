"""The `recsys` command: help, exit codes, one-line errors."""

from __future__ import annotations

from tests.conftest import run_cli


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("data", "bench", "--debug", "--quiet"):
        assert word in result.stdout


def test_subcommand_help():
    for args, words in [
        (("data", "--help"), ("synth", "build", "report")),
        (("data", "synth", "--help"), ("--preset", "--config", "--seed", "--out", "--set", "small")),
        (("data", "build", "--help"), ("--source", "--strict", "synth:DIR", "taobao:FILE")),
        (("bench", "data", "--help"), ("--preset", "--json")),
    ]:
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        for word in words:
            assert word in result.stdout, (args, word)


def test_config_error_is_one_line_and_exit_2(tmp_path):
    result = run_cli("data", "synth", "--out", str(tmp_path / "w"), "--set", "num_user=5")
    assert result.returncode == 2
    assert result.stderr == (
        "recsys: error: config error in --set num_user=5: unknown key 'num_user'; did you mean 'num_users'?\n"
    )
    assert not (tmp_path / "w").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "data", "synth", "--out", str(tmp_path / "w"), "--set", "num_user=5")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_usage_error_is_one_line_and_exit_2():
    result = run_cli("data", "synth")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--out" in result.stderr and "--help" in result.stderr


def test_unknown_preset(tmp_path):
    result = run_cli("data", "synth", "--preset", "huge", "--out", str(tmp_path / "w"))
    assert result.returncode == 2
    assert "unknown preset 'huge'; presets: large, medium, small" in result.stderr


def test_synth_build_report_round_trip(tmp_path):
    world, data = tmp_path / "world", tmp_path / "data"
    args = ["--set", "num_users=80", "--set", "num_items=800", "--set", "num_categories=20", "--set", "num_brands=8"]
    assert run_cli("data", "synth", "--preset", "small", "--seed", "3", "--out", str(world), *args).returncode == 0
    built = run_cli("data", "build", "--source", f"synth:{world}", "--out", str(data))
    assert built.returncode == 0, built.stderr
    assert "data report: synth:" in built.stdout and "oracle AUC" in built.stdout
    shown = run_cli("data", "report", str(data))
    assert shown.returncode == 0 and "history length per user" in shown.stdout
    raw = run_cli("data", "report", str(data), "--json")
    assert '"rows_rejected": 0' in raw.stdout


def test_existing_output_is_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_cli("data", "synth", "--out", str(out), "--set", "num_users=10")
    assert result.returncode == 2
    assert "is not empty; pass --overwrite to replace it" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_report_of_a_missing_directory(tmp_path):
    result = run_cli("data", "report", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert result.stderr.startswith("recsys: error: data report not found:")
