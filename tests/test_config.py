"""Config loading: schemas, overrides and the exact error messages."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml
from pydantic import BaseModel

from recsys.config import _section_model, load_config, parse_override
from recsys.errors import ConfigError
from recsys.model_schemas import RunConfig
from recsys.schemas import BuildConfig, SynthConfig
from recsys.sim_schemas import ExploreSimConfig
from tests.conftest import ROOT, run_cli


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("preset", ["small", "medium", "large"])
def test_presets_load(preset):
    cfg = load_config(SynthConfig, ROOT / "configs" / "synth" / f"{preset}.yaml")
    assert cfg.time.history_days >= 180


def test_preset_sizes_meet_the_contract():
    medium = load_config(SynthConfig, ROOT / "configs" / "synth" / "medium.yaml")
    large = load_config(SynthConfig, ROOT / "configs" / "synth" / "large.yaml")
    assert medium.num_users >= 20_000 and medium.activity.max_events >= 5_000
    assert large.num_users >= 1_000_000 and large.activity.max_events >= 54_000


def test_default_build_config_file_matches_the_schema_defaults():
    assert load_config(BuildConfig, ROOT / "configs" / "data" / "default.yaml") == BuildConfig()


def test_unknown_top_level_key_suggests_the_nearest(tmp_path):
    path = write(tmp_path, "num_user: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, path)
    assert str(err.value) == f"config error in {path}: unknown key 'num_user'; did you mean 'num_users'?"


def test_unknown_nested_key_names_its_path_and_suggestion(tmp_path):
    path = write(tmp_path, "click_model:\n  bais: -3\n")
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, path)
    assert str(err.value) == f"config error in {path}: unknown key 'bais' at click_model.bais; did you mean 'bias'?"


def test_unknown_key_without_a_close_match_lists_the_valid_keys(tmp_path):
    path = write(tmp_path, "split:\n  zzz: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' at split.zzz; valid keys here: test_fraction, valid_fraction$"):
        load_config(BuildConfig, path)


def test_wrong_type_names_path_expected_type_and_value(tmp_path):
    path = write(tmp_path, "activity:\n  max_events: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, path)
    assert str(err.value) == f"config error in {path}: activity.max_events: expected an integer, got 'lots' (str)"


def test_wrong_type_for_a_literal_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        load_config(BuildConfig, overrides=["sampling.strategy=popular"])
    assert str(err.value) == (
        "config error in --set sampling.strategy=popular: sampling.strategy: "
        "expected one of 'uniform', 'same_category', got 'popular' (str)"
    )


def test_wrong_type_inside_a_list():
    with pytest.raises(ConfigError, match=r"sampling.positive_behaviors.1: expected one of 'pv', 'cart', 'fav', 'buy', got 'click' \(str\)"):
        load_config(BuildConfig, overrides=["sampling.positive_behaviors=[pv, click]"])


def test_a_section_given_a_scalar(tmp_path):
    path = write(tmp_path, "time: 5\n")
    with pytest.raises(ConfigError, match=r"time: expected a section \(a mapping of keys to values\), got 5 \(int\)"):
        load_config(SynthConfig, path)


def test_range_rule_names_the_value():
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, overrides=["num_users=0"])
    assert str(err.value) == "config error in --set num_users=0: num_users: input should be greater than or equal to 1, got 0 (int)"


def test_cross_field_rule_names_both_fields_and_the_override(tmp_path):
    path = write(tmp_path, "interests:\n  max_long_term: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, path, ["interests.min_long_term=4"])
    assert str(err.value) == (
        f"config error in {path} with --set interests.min_long_term=4: "
        "interests: min_long_term (4) must be <= max_long_term (3)"
    )


def test_several_errors_are_counted_on_one_line(tmp_path):
    path = write(tmp_path, "num_users: x\nnum_items: y\nseed: z\n")
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, path)
    assert str(err.value).endswith("(and 2 more errors)")
    assert "\n" not in str(err.value)


def test_override_values_are_yaml():
    cfg = load_config(
        BuildConfig, overrides=["split.test_fraction=0.2", "sampling.positive_behaviors=[buy]", "sampling.max_per_user=null"]
    )
    assert cfg.split.test_fraction == 0.2
    assert cfg.sampling.positive_behaviors == ["buy"]
    assert cfg.sampling.max_per_user is None


def test_override_beats_the_file(tmp_path):
    path = write(tmp_path, "num_users: 10\nclick_model: {bias: -2.0}\n")
    cfg = load_config(SynthConfig, path, ["click_model.bias=-3.5"])
    assert (cfg.num_users, cfg.click_model.bias, cfg.click_model.long_term) == (10, -3.5, 2.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("num_users", "bad override 'num_users': expected KEY=VALUE, e.g. --set num_users=500"),
        ("=5", "bad override '=5': expected KEY=VALUE, e.g. --set num_users=500"),
        ("a..b=1", "bad override 'a..b=1': empty segment in key 'a..b'"),
        ("seed=[1", "bad override 'seed=[1': the value '[1' is not valid YAML (quote strings that contain ':' or '#')"),
    ],
)
def test_bad_override_syntax(text, message):
    with pytest.raises(ConfigError) as err:
        parse_override(text)
    assert str(err.value) == message


def test_override_of_an_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, overrides=["impressions.candidate=5"])
    assert str(err.value) == (
        "config error in --set impressions.candidate=5: unknown key 'candidate' at impressions.candidate; "
        "did you mean 'candidates'?"
    )


def test_override_cannot_descend_into_a_value():
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, overrides=["seed.x=1"])
    assert str(err.value) == "config error in --set seed.x=1: seed is a value, not a section, so seed.x does not exist"


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "seed: 1\nnum_users: [3\n")
    with pytest.raises(ConfigError, match=rf"^config error in {path}:3: invalid YAML"):
        load_config(SynthConfig, path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, path)
    assert str(err.value) == f"config error in {path}: the top level must be a mapping of keys to values, got list"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(SynthConfig, tmp_path / "nope.yaml")


def test_naive_datetimes_are_utc_and_offsets_are_kept():
    cfg = load_config(SynthConfig, overrides=["time.start=2026-03-01T00:00:00"])
    assert cfg.time.start == dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    b = load_config(BuildConfig, overrides=["taobao.min_timestamp=2017-11-25T00:00:00+08:00"])
    assert int(b.taobao.min_timestamp.timestamp()) == 1511539200


def test_configs_are_frozen():
    cfg = SynthConfig()
    with pytest.raises(Exception, match="frozen"):
        cfg.num_users = 3  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Non-finite numbers: refused at load, wherever a float is (a NaN learning rate trains nothing)


def float_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every float field of ``model``, nested sections included."""
    keys = []
    for name, info in model.model_fields.items():
        section = _section_model(info.annotation)
        if section is not None:
            keys += float_keys(section, f"{prefix}{name}.")
        elif "float" in str(info.annotation):
            keys.append(prefix + name)
    return keys


SCHEMAS = [SynthConfig, BuildConfig, RunConfig, ExploreSimConfig]
FLOAT_KEYS = [(schema, key) for schema in SCHEMAS for key in float_keys(schema)]


def test_every_schema_has_float_fields_to_check():
    assert {s.__name__ for s, _ in FLOAT_KEYS} == {s.__name__ for s in SCHEMAS}
    assert ("RunConfig", "train.lr") in {(s.__name__, k) for s, k in FLOAT_KEYS}


@pytest.mark.parametrize(("schema", "key"), FLOAT_KEYS, ids=[f"{s.__name__}.{k}" for s, k in FLOAT_KEYS])
@pytest.mark.parametrize(("text", "shown"), [(".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan")])
def test_a_non_finite_number_is_refused_naming_the_key(schema, key, text, shown):
    with pytest.raises(ConfigError) as err:
        load_config(schema, overrides=[f"{key}={text}"])
    assert str(err.value) == f"config error in --set {key}={text}: {key}: input should be a finite number, got {shown} (float)"


@pytest.mark.parametrize("text", [".nan", "1.0e+400", "-.Inf"])
def test_a_non_finite_number_in_a_file_is_refused(tmp_path, text):
    path = write(tmp_path, f"model:\n  head:\n    dropout: 0.1\ntrain:\n  lr: {text}\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert str(err.value) == (
        f"config error in {path}: train.lr: input should be a finite number, got {float(yaml.safe_load(text))!r} (float)")


def test_a_non_finite_number_inside_a_list_of_sections_is_refused(tmp_path):
    path = write(tmp_path, "policies:\n  - {name: e, kind: epsilon_greedy, epsilon: .nan}\n")
    with pytest.raises(ConfigError) as err:
        load_config(ExploreSimConfig, path)
    assert str(err.value) == f"config error in {path}: policies.0.epsilon: input should be a finite number, got nan (float)"
    path = write(tmp_path, "policies:\n  - {name: a, kind: age, explore: {lam: .inf}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(ExploreSimConfig, path)
    assert str(err.value) == (
        f"config error in {path}: policies[a].explore: lam: input should be a finite number, got inf (float)")


def test_train_with_an_infinite_learning_rate_exits_2_before_any_work(tmp_path):
    result = run_cli("train", "--config", str(ROOT / "configs" / "models" / "din.yaml"), "--data",
                     str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--set", "train.lr=.inf")
    assert (result.returncode, result.stderr) == (
        2, "recsys: error: config error in --set train.lr=.inf: train.lr: input should be a finite number, got inf (float)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
