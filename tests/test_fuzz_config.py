"""Config loading under fuzzing: any YAML file and any ``--set`` give a config (finite, and it
dumps and loads back to itself) or one ConfigError line that names its source; never another
exception. Strategies and the oracle are in tests/fuzz.py.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys.config import load_config
from recsys.errors import ConfigError
from recsys.model_schemas import RunConfig
from tests import fuzz
from tests.conftest import run_cli
from tests.fuzz import (
    PATHS,
    SCHEMAS,
    ConfigCase,
    case_from_file,
    check_config,
    config_cases,
    regression_files,
)

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(FUZZ, max_examples=150)
@given(case=config_cases())
def test_any_config_input_loads_or_fails_with_one_line(case):
    check_config(case)


def _leaf_keys(kind: type) -> list[tuple[str, str]]:
    """(schema, dotted key) of every field of type ``kind`` (float or int), nested ones included."""
    keys = []
    for name, schema in SCHEMAS.items():
        for path in PATHS[name]:
            model, *parts = [schema, *path.split(".")]
            for part in parts[:-1]:
                model = model.model_fields[part].annotation
            if model.model_fields[parts[-1]].annotation is kind:
                keys.append((name, path))
    return keys


FLOATS, INTS = _leaf_keys(float), _leaf_keys(int)


@settings(FUZZ, max_examples=60)
@given(key=st.sampled_from(FLOATS), value=st.sampled_from([math.inf, -math.inf, math.nan]), as_file=st.booleans())
def test_a_non_finite_number_anywhere_is_refused_naming_its_key(tmp_path_factory, key, value, as_file):
    schema, dotted = key
    text = {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
    if as_file:
        path = tmp_path_factory.mktemp("cfg") / "c.yaml"
        *parents, leaf = dotted.split(".")
        path.write_text("".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parents)) + f"{'  ' * len(parents)}{leaf}: {text}\n")
        source, args = str(path), (path, [])
    else:
        source, args = f"--set {dotted}={text}", (None, [f"{dotted}={text}"])
    with pytest.raises(ConfigError) as err:
        load_config(SCHEMAS[schema], *args)
    assert str(err.value) == f"config error in {source}: {dotted}: input should be a finite number, got {value!r} (float)"


@settings(FUZZ, max_examples=40)
@given(key=st.sampled_from(INTS), value=st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1)))
def test_an_integer_beyond_64_bits_is_refused_naming_its_key(key, value):
    schema, dotted = key
    with pytest.raises(ConfigError) as err:
        load_config(SCHEMAS[schema], overrides=[f"{dotted}={value}"])
    text = str(err.value)
    assert text.startswith(f"config error in --set {dotted}=") and f": {dotted}: " in text, text[:200]
    assert text.endswith("is out of range: integers must fit in 64 bits, [-2**63, 2**63 - 1]") and len(text) < 800


def test_every_numeric_field_is_fuzzed():
    assert ("RunConfig", "train.lr") in FLOATS and ("RunConfig", "model.head.dropout") in FLOATS
    assert ("SynthConfig", "num_users") in INTS and len(FLOATS) > 40 and len(INTS) > 30


# --------------------------------------------------------------------------------------------
# What the fuzzing found, kept as plain tests


def test_yaml_nested_deeper_than_the_stack_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: " + "[" * 5000)
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert str(err.value) == f"config error in {path}: invalid YAML: nested too deeply"
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, overrides=["train.lr=" + "[" * 5000])
    assert str(err.value).endswith("the value is not valid YAML: nested too deeply")


def test_yaml_values_python_cannot_build_are_config_errors():
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, overrides=["train.lr=2026-13-01"])
    assert str(err.value) == "bad override 'train.lr=2026-13-01': the value is not valid YAML: month must be in 1..12"
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, overrides=["train.epochs=" + "9" * 5000])
    assert "the value is not valid YAML: Exceeds the limit (4300 digits) for integer string conversion" in str(err.value)
    assert len(str(err.value)) < 700


def test_a_huge_override_is_cut_in_the_message():
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, overrides=["x" * 100_000])
    assert str(err.value) == f"bad override '{'x' * 300}... (cut: 100000 characters in all)': expected KEY=VALUE, e.g. --set num_users=500"
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, overrides=["train.lr=" + "x" * 100_000])
    text = str(err.value)
    assert text.startswith(f"config error in --set train.lr={'x' * 291}... (cut: 100009 characters in all): train.lr: ")
    assert text.endswith(f"got '{'x' * 57}...{'x' * 58}' (str)"), text[-200:]


def test_control_characters_in_an_override_are_escaped_in_the_message():
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, overrides=["tra\rin\n.lr=1"])
    assert str(err.value) == "config error in --set tra\\rin\\n.lr=1: unknown key 'tra\\rin\\n'; did you mean 'train'?"


def test_yaml_aliases_are_not_expanded_into_the_message(tmp_path):
    rows = ["a0: &a0 [1, 2]", *(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 40))]
    path = tmp_path / "c.yaml"
    path.write_text("\n".join(rows) + "\ntrain:\n  epochs: *a39\n")  # 3**39 leaves if expanded
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert str(err.value).startswith(f"config error in {path}: train.epochs: expected an integer, got [[[[...], [...], [...]]")


REGRESSIONS = [p for t, p in regression_files() if t == "config"]


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_inputs_the_long_fuzz_run_found(path):
    check_config(case_from_file("config", path))


def test_the_oracle_catches_a_non_finite_value(monkeypatch):
    # the oracle must be able to fail: a loader that let inf through is caught
    lax = RunConfig().model_copy(update={"train": RunConfig().train.model_copy(update={"lr": math.inf})})
    monkeypatch.setattr(fuzz, "load_config", lambda *args, **kwargs: lax)
    with pytest.raises(AssertionError, match=r"non-finite values accepted at \['\.train\.lr'\]"):
        check_config(ConfigCase("RunConfig"))


# --------------------------------------------------------------------------------------------
# Through the command line


@pytest.mark.parametrize(("override", "stderr"), [
    ("split.valid_fraction=.nan", "config error in --set split.valid_fraction=.nan: split.valid_fraction: input should be a "
     "finite number, got nan (float)"),
    ("sampling.seed=" + "9" * 30, f"config error in --set sampling.seed={'9' * 30}: sampling.seed: {'9' * 30} (int) is out "
     "of range: integers must fit in 64 bits, [-2**63, 2**63 - 1]"),
    ("split.test_fraction=" + "[" * 3000, "bad override '" + "split.test_fraction=" + "[" * 280 + "... (cut: 3020 characters in "
     "all)': the value is not valid YAML: nested too deeply"),
], ids=["nan", "huge", "deep"])
def test_data_build_exits_2_with_one_line_before_any_work(tmp_path, override, stderr):
    result = run_cli("data", "build", "--source", f"taobao:{tmp_path / 'none.csv'}", "--out", str(tmp_path / "out"),
                     "--set", override)
    assert (result.returncode, result.stderr) == (2, f"recsys: error: {stderr}\n")
    assert list(tmp_path.iterdir()) == []
