"""Tests for gpt.config, gpt.config_fields and gpt.config_values: key lookup, value parsing,
precedence, validation, save and load."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from gpt.config import ConfigError, build_config, config_to_dict, load_config, option, save_config
from gpt.config_fields import describe_fields, describe_groups, field_type


@dataclass
class Model:
    n_layer: int = option(2, "number of transformer blocks")
    n_head: int = option(4, "number of attention heads")
    n_embd: int = option(32, "width of the residual stream")
    dropout: float = option(0.0, "dropout probability")
    norm: Literal["layernorm", "rmsnorm"] = option("layernorm", "normalization layer")

    def problems(self) -> list[str]:
        if self.n_embd % self.n_head:
            return [f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}). Change one of them."]
        return []


@dataclass
class Head:
    dropout: float = option(0.1, "dropout probability of the head")
    n_out: int = option(1, "number of outputs")


@dataclass
class Train:
    name: str = option("run", "run name")
    steps: int = option(10, "optimizer steps")
    lr: float = option(6e-4, "peak learning rate")
    compile: bool = option(False, "compile the model")
    seed: int | None = option(None, "random seed, or none for a random one")
    betas: tuple[float, ...] = option((0.9, 0.95), "AdamW betas")
    window: tuple[int, str] = option((1, "a"), "a pair")
    tags: list[str] = option([], "free-form tags")
    out_dir: Path = option(Path("runs"), "output folder")
    weights: dict[str, float] = option({}, "mixture weights by source")
    schedule: Literal["cosine", "wsd"] = option("cosine", "learning-rate schedule")
    anything: Any = option(None, "any value")
    model: Model = option(Model, "model architecture")
    head: Head = option(Head, "output head")

    def problems(self) -> list[str]:
        if self.lr <= 0:
            return [f"lr must be positive, got {self.lr}. Use a value such as 6e-4."]
        return []


@dataclass
class Custom:
    model: Model = option(Model(n_layer=5), "a model with a custom default")


@dataclass
class Derived:
    size: int = option(3, "size")
    double: int = option(0, "twice size", init=False)

    def __post_init__(self) -> None:
        self.double = 2 * self.size


@dataclass
class Required:
    data: str = dataclasses.field(metadata={"help": "data file"})
    steps: int = option(1, "steps")


def build(**overrides: str) -> Train:
    return build_config(Train, overrides=list(overrides.items()))


def problems_of(error: pytest.ExceptionInfo) -> list[str]:
    return error.value.problems


# --- defaults and option ---


def test_defaults():
    cfg = build_config(Train)
    assert cfg == Train()
    assert cfg.model.n_layer == 2


def test_option_help_metadata():
    help_by_name = {f.name: f.metadata["help"] for f in dataclasses.fields(Train)}
    assert help_by_name["lr"] == "peak learning rate"


def test_option_mutable_not_shared():
    first, second = Train(), Train()
    first.tags.append("x")
    first.model.n_layer = 9
    assert second.tags == []
    assert second.model.n_layer == 2


def test_option_instance_default():
    assert build_config(Custom).model.n_layer == 5
    assert build_config(Custom, overrides=[("n_head", "2")]).model.n_layer == 5


# --- precedence ---


def test_precedence(tmp_path):
    preset = {"steps": 20, "lr": 1e-3, "model": {"n_layer": 3, "n_embd": 64}}
    config_file = tmp_path / "run.yaml"
    config_file.write_text("steps: 30\nmodel:\n  n_layer: 4\n")
    cfg = build_config(Train, presets=[preset], config_file=config_file, overrides=[("steps", "40")])
    assert cfg.steps == 40  # override beats file and preset
    assert cfg.model.n_layer == 4  # file beats preset
    assert cfg.lr == 1e-3  # preset beats default
    assert cfg.model.n_embd == 64
    assert cfg.name == "run"  # default


def test_presets_apply_in_order():
    cfg = build_config(Train, presets=[{"steps": 1, "name": "a"}, {"steps": 2}])
    assert cfg.steps == 2
    assert cfg.name == "a"


def test_overrides_last_wins():
    cfg = build_config(Train, overrides=[("n_layer", "3"), ("model.n_layer", "5")])
    assert cfg.model.n_layer == 5


def test_overrides_as_dict():
    assert build_config(Train, overrides={"steps": "7"}).steps == 7


# --- keys ---


def test_dotted_and_bare_keys():
    cfg = build(**{"model.n_layer": "3", "n_embd": "64", "head.n_out": "2"})
    assert cfg.model.n_layer == 3
    assert cfg.model.n_embd == 64
    assert cfg.head.n_out == 2


def test_hyphen_keys():
    cfg = build_config(Train, overrides=[("model.n-layer", "3"), ("n-head", "2")])
    assert cfg.model.n_layer == 3
    assert cfg.model.n_head == 2


def test_dotted_keys_in_preset_and_file(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model.n_embd: 48\nhead:\n  n-out: 4\n")
    cfg = build_config(Train, presets=[{"model.n_layer": 6}], config_file=config_file)
    assert cfg.model.n_layer == 6
    assert cfg.model.n_embd == 48
    assert cfg.head.n_out == 4


def test_ambiguous_key_lists_dotted_names():
    with pytest.raises(ConfigError, match="matches several fields") as error:
        build(dropout="0.2")
    assert "head.dropout" in str(error.value)
    assert "model.dropout" in str(error.value)


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown field 'n_layr'") as error:
        build(n_layr="3")
    assert "Did you mean model.n_layer?" in str(error.value)


def test_unknown_key_no_suggestion():
    with pytest.raises(ConfigError, match="Train has no field of that name"):
        build(zzzzzz="1")


def test_unknown_nested_key_in_file(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model:\n  n_lyer: 3\n")
    with pytest.raises(ConfigError, match="Did you mean model.n_layer") as error:
        build_config(Train, config_file=config_file)
    assert "run.yaml" in str(error.value)


def test_group_key_needs_mapping():
    with pytest.raises(ConfigError, match="model is a group of fields"):
        build(model="3")


def test_field_type_lookup():
    assert field_type(Train, "n-layer") is int
    assert field_type(Train, "dropout") is None  # ambiguous
    assert field_type(Train, "nope") is None


# --- parsing strings from the command line ---


@pytest.mark.parametrize("text, expected", [("12", 12), ("1_000", 1000), ("1e3", 1000), ("-3", -3), ("2.0", 2)])
def test_parse_int(text, expected):
    assert build(steps=text).steps == expected


@pytest.mark.parametrize("text", ["1.5", "1e-3", "abc", "", "true"])
def test_parse_int_invalid(text):
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        build(steps=text)


@pytest.mark.parametrize("text, expected", [("6e-4", 6e-4), ("1", 1.0), ("0.5", 0.5), ("1_000.5", 1000.5)])
def test_parse_float(text, expected):
    assert build(lr=text).lr == expected


def test_parse_float_invalid():
    with pytest.raises(ConfigError, match="lr: expected a number but received 'fast'"):
        build(lr="fast")


@pytest.mark.parametrize("text", ["true", "True", "1", "yes", "on", "ON"])
def test_parse_bool_true(text):
    assert build(compile=text).compile is True


@pytest.mark.parametrize("text", ["false", "FALSE", "0", "no", "off"])
def test_parse_bool_false(text):
    assert build(compile=text).compile is False


def test_parse_bool_invalid():
    with pytest.raises(ConfigError, match="compile: expected true or false but received 'maybe'"):
        build(compile="maybe")


def test_parse_str_keeps_text():
    assert build(name=" two words ").name == " two words "


@pytest.mark.parametrize("text", ["none", "None", "null", "NULL"])
def test_parse_optional_none(text):
    assert build_config(Train, presets=[{"seed": 1}], overrides=[("seed", text)]).seed is None


def test_parse_optional_value():
    assert build(seed="5").seed == 5


def test_parse_optional_invalid():
    with pytest.raises(ConfigError, match="seed: expected an integer or none but received 'x'"):
        build(seed="x")


def test_parse_literal():
    assert build(schedule="wsd").schedule == "wsd"


def test_parse_literal_invalid_lists_choices():
    with pytest.raises(ConfigError, match="schedule: expected one of 'cosine', 'wsd' but received 'step'"):
        build(schedule="step")


def test_parse_tuple():
    assert build(betas="0.8, 0.99").betas == (0.8, 0.99)


def test_parse_tuple_empty():
    assert build(betas="").betas == ()


def test_parse_tuple_bad_item():
    with pytest.raises(ConfigError, match="betas: expected a comma-separated list of float"):
        build(betas="0.9,x")


def test_parse_fixed_tuple():
    assert build(window="3,b").window == (3, "b")


def test_parse_fixed_tuple_wrong_length():
    with pytest.raises(ConfigError, match=r"window: expected 2 comma-separated values \(int, str\)"):
        build(window="3")


def test_parse_list():
    assert build(tags="a,b").tags == ["a", "b"]


def test_parse_path():
    assert build(out_dir="runs/x").out_dir == Path("runs/x")


def test_parse_dict():
    assert build(weights="{web: 0.7, books: 1}").weights == {"web": 0.7, "books": 1.0}


def test_parse_any_keeps_text():
    assert build(anything="7").anything == "7"


# --- checking typed values from YAML and presets ---


def test_yaml_values_typed(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "lr: 3\nbetas: [0.8, 0.9]\ntags: [x]\nseed: null\ncompile: yes\nout_dir: out\nwindow: [2, b]\n"
    )
    cfg = build_config(Train, config_file=config_file)
    assert cfg.lr == 3.0
    assert isinstance(cfg.lr, float)
    assert cfg.betas == (0.8, 0.9)
    assert cfg.tags == ["x"]
    assert cfg.seed is None
    assert cfg.compile is True
    assert cfg.out_dir == Path("out")
    assert cfg.window == (2, "b")


def test_yaml_exponent_without_dot(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("lr: 6e-4\nsteps: 1e3\n")
    with pytest.raises(ConfigError) as error:
        build_config(Train, config_file=config_file)
    # 6e-4 must load as a float, so the only problem is 1e3 (a float) for an int field.
    assert problems_of(error) == [
        f"steps: expected an integer but received 1000.0 from config file {str(config_file)!r}."
    ]


def test_yaml_str_for_int(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("steps: '12'\n")
    with pytest.raises(ConfigError, match="steps: expected an integer but received '12'") as error:
        build_config(Train, config_file=config_file)
    assert "without quotes" in str(error.value)


def test_yaml_int_for_str(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("name: 2024\n")
    with pytest.raises(ConfigError, match="name: expected a string but received 2024") as error:
        build_config(Train, config_file=config_file)
    assert "in quotes" in str(error.value)


@pytest.mark.parametrize(
    "preset, field",
    [
        ({"steps": True}, "steps"),
        ({"lr": False}, "lr"),
        ({"compile": 1}, "compile"),
        ({"schedule": "step"}, "schedule"),
        ({"betas": 0.9}, "betas"),
        ({"model": {"n_layer": None}}, "model.n_layer"),
    ],
)
def test_preset_value_wrong_type(preset, field):
    with pytest.raises(ConfigError, match=f"{field}: expected") as error:
        build_config(Train, presets=[("mine", preset)])
    assert "preset 'mine'" in str(error.value)


def test_typed_override_checked():
    assert build_config(Train, overrides=[("steps", 5)]).steps == 5


# --- config files ---


def test_config_file_missing(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config(Train, config_file=tmp_path / "nope.yaml")


def test_config_file_not_mapping(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must contain a mapping"):
        build_config(Train, config_file=config_file)


def test_config_file_invalid_yaml(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        build_config(Train, config_file=config_file)


def test_config_file_empty(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("")
    assert build_config(Train, config_file=config_file) == Train()


# --- validation ---


def test_all_problems_at_once():
    with pytest.raises(ConfigError) as error:
        build_config(
            Train,
            overrides=[("steps", "many"), ("schedule", "step"), ("lr", "-1"), ("n_embd", "30"), ("n_layr", "2")],
        )
    message = str(error.value)
    assert "steps: expected an integer but received 'many'" in message
    assert "schedule: expected one of 'cosine', 'wsd' but received 'step'" in message
    assert "lr must be positive, got -1.0" in message
    assert "model: n_embd (30) must be divisible by n_head (4)" in message
    assert "unknown field 'n_layr'" in message
    assert len(problems_of(error)) == 5
    assert message.startswith("invalid Train: 5 problems\n")
    assert len(message.splitlines()) == 6


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        build(steps="x")


def test_required_field():
    with pytest.raises(ConfigError, match="data has no default"):
        build_config(Required)
    assert build_config(Required, overrides=[("data", "a.txt")]).data == "a.txt"


def test_post_init_sees_final_values():
    cfg = build_config(Derived, overrides=[("size", "5")])
    assert cfg.double == 10


def test_init_false_field_not_settable():
    with pytest.raises(ConfigError, match="unknown field 'double'"):
        build_config(Derived, overrides=[("double", "5")])


# --- save, load, describe ---


def test_config_to_dict_plain():
    data = config_to_dict(Train())
    assert data["betas"] == [0.9, 0.95]
    assert data["out_dir"] == "runs"
    assert data["model"] == {"n_layer": 2, "n_head": 4, "n_embd": 32, "dropout": 0.0, "norm": "layernorm"}
    assert yaml.safe_load(yaml.safe_dump(data)) == data


def test_config_to_dict_skips_derived():
    assert config_to_dict(Derived()) == {"size": 3}


def test_save_load_round_trip(tmp_path):
    cfg = build(steps="7", lr="1e-3", seed="3", betas="0.8,0.9", window="4,z", tags="a,b", n_layer="3",
                weights="{web: 0.5}", out_dir="runs/x", compile="true", norm="rmsnorm")
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(Train, path) == cfg
    assert os.listdir(path.parent) == ["config.yaml"]  # no temporary file left behind


def test_save_replaces_file(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(build(steps="1"), path)
    save_config(build(steps="2"), path)
    assert load_config(Train, path).steps == 2


def test_load_rejects_bare_key(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("n_layer: 3\n")
    with pytest.raises(ConfigError, match="unknown field 'n_layer'"):
        load_config(Train, path)


def test_load_rejects_wrong_type(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  n_layer: three\n")
    with pytest.raises(ConfigError, match="model.n_layer: expected an integer"):
        load_config(Train, path)


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Train, tmp_path / "config.yaml")


def test_describe_fields():
    rows = {row[0]: row for row in describe_fields(Train)}
    assert rows["model.n_layer"] == ("model.n_layer", "int", "2", "number of transformer blocks")
    assert rows["seed"] == ("seed", "int | None", "none", "random seed, or none for a random one")
    assert rows["betas"][1:3] == ("tuple[float, ...]", "0.9,0.95")
    assert rows["schedule"][1] == "{cosine,wsd}"
    assert rows["compile"][2] == "false"


def test_describe_fields_order():
    names = [row[0] for row in describe_fields(Train)]
    assert names[:3] == ["name", "steps", "lr"]
    assert names[-2:] == ["head.dropout", "head.n_out"]


def test_describe_groups():
    assert describe_groups(Train) == [("", ""), ("model", "model architecture"), ("head", "output head")]
