"""vgen.config: building dataclass trees from YAML and `--set` overrides, and the errors users see."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from vgen.config import apply_overrides, from_dict, load_config, parse_override, to_dict
from vgen.errors import ConfigError


@dataclass
class Model:
    kind: Literal["dit", "unet"] = "dit"
    width: int = 64
    depths: list[int] = field(default_factory=lambda: [2, 2])


@dataclass
class Train:
    lr: float = 1e-3
    steps: int = 100
    compile: bool = False
    resume_from: Path | None = None
    betas: tuple[float, float] = (0.9, 0.99)
    milestones: tuple[int, ...] = ()
    loss_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


@dataclass
class Root:
    name: str
    model: Model = field(default_factory=lambda: Model(width=128))
    train: Train = field(default_factory=Train)
    seed: Optional[int] = None
    teacher: Model | None = None


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == 2
    return str(info.value)


def test_nested_build_and_defaults():
    cfg = from_dict(Root, {"name": "tiny", "train": {"steps": 5}, "model": {"kind": "unet"}})
    assert cfg.name == "tiny"
    assert cfg.train == Train(steps=5)
    # a partial section keeps the rest of its field's default, here the factory's width=128
    assert cfg.model == Model(kind="unet", width=128)
    assert cfg.seed is None


def test_float_accepts_ints_and_yaml_strings():
    assert yaml.safe_load("lr: 3e-4")["lr"] == "3e-4"  # why the coercion exists
    assert from_dict(Train, {"lr": "3e-4"}).lr == pytest.approx(3e-4)
    assert from_dict(Train, {"lr": 1}).lr == 1.0 and isinstance(from_dict(Train, {"lr": 1}).lr, float)
    msg = error_of(from_dict, Train, {"lr": "fast"}, source="x.yaml")
    assert msg == "x.yaml: lr: expected float, got 'fast' (str)"


@pytest.mark.parametrize("value", ["yes", 1, 0, "true", None])
def test_bool_is_strict(value):
    msg = error_of(from_dict, Train, {"compile": value})
    assert "compile: expected bool" in msg


def test_int_rejects_bool_and_strings():
    msg = error_of(from_dict, Root, {"name": "a", "train": {"steps": "abc"}}, source="configs/x.yaml")
    assert msg == "configs/x.yaml: train.steps: expected int, got 'abc' (str)"
    assert "expected int" in error_of(from_dict, Train, {"steps": True})


def test_literal_rejection_lists_choices():
    msg = error_of(from_dict, Root, {"name": "a", "model": {"kind": "vit"}})
    assert "model.kind: expected one of 'dit', 'unet', got 'vit' (str)" in msg


def test_optional_values():
    assert from_dict(Root, {"name": "a", "seed": 7}).seed == 7
    assert from_dict(Root, {"name": "a", "seed": None}).seed is None
    assert from_dict(Train, {"resume_from": "runs/a"}).resume_from == Path("runs/a")
    assert "seed: expected int or null, got 'x'" in error_of(from_dict, Root, {"name": "a", "seed": "x"})
    assert from_dict(Root, {"name": "a", "teacher": {"width": 8}}).teacher == Model(width=8)
    msg = error_of(from_dict, Root, {"name": "a", "teacher": {"widht": 8}})
    assert "unknown key 'teacher.widht' (did you mean 'teacher.width'?)" in msg
    msg = error_of(from_dict, Root, {"name": "a", "teacher": 3})
    assert "teacher: expected mapping (Model) or null, got 3 (int)" in msg


def test_lists_tuples_and_dicts():
    cfg = from_dict(Train, {"betas": [0.5, "0.9"], "milestones": [1, 2, 3], "loss_weights": {"mse": 1}})
    assert cfg.betas == (0.5, 0.9)
    assert cfg.milestones == (1, 2, 3)
    assert cfg.loss_weights == {"mse": 1.0}
    assert "betas: expected list of 2 items (float, float)" in error_of(from_dict, Train, {"betas": [1]})
    assert "milestones[1]: expected int, got 'x'" in error_of(from_dict, Train, {"milestones": [1, "x"]})
    msg = error_of(from_dict, Root, {"name": "a", "model": {"depths": 3}})
    assert "model.depths: expected list of int, got 3 (int)" in msg
    assert "loss_weights.mse: expected float" in error_of(from_dict, Train, {"loss_weights": {"mse": "x"}})


def test_unknown_key_suggests_with_full_path():
    msg = error_of(from_dict, Root, {"name": "a", "train": {"lrr": 1}}, source="configs/tiny.yaml")
    assert msg.startswith("configs/tiny.yaml: unknown key 'train.lrr' (did you mean 'train.lr'?)")
    assert "valid keys under 'train': lr, steps, compile" in msg
    msg = error_of(from_dict, Root, {"name": "a", "modle": {}})
    assert "unknown key 'modle' (did you mean 'model'?); valid keys: name, model, train, seed, teacher" in msg
    assert "did you mean" not in error_of(from_dict, Root, {"name": "a", "zzzzzz": 1})


def test_missing_required_field():
    assert "missing required key 'name' (str)" in error_of(from_dict, Root, {}, source="c.yaml")


def test_post_init_value_error_becomes_config_error():
    msg = error_of(from_dict, Root, {"name": "a", "train": {"steps": -1}}, source="c.yaml")
    assert msg == "c.yaml: train: steps must be >= 0, got -1"


def test_top_level_must_be_mapping():
    assert "expected a mapping" in error_of(from_dict, Root, [1, 2], source="c.yaml")


def test_parse_override():
    assert parse_override("train.lr=3e-4") == ("train.lr", "3e-4")
    assert parse_override("train.compile=true") == ("train.compile", True)
    assert parse_override("model.depths=[1, 2]") == ("model.depths", [1, 2])
    assert parse_override("seed=null") == ("seed", None)
    assert parse_override("name=a=b") == ("name", "a=b")
    for bad in ["train.lr", "=3", "train..lr=1", " =1"]:
        assert "key.path=value" in error_of(parse_override, bad)
    assert "not valid YAML" in error_of(parse_override, "model.depths=[1, 2")


def test_apply_overrides_creates_sections_and_copies():
    data = {"name": "a", "train": {"lr": 1.0}}
    out = apply_overrides(data, ["train.steps=7", "model.width=32", "seed=3"])
    assert out == {"name": "a", "train": {"lr": 1.0, "steps": 7}, "model": {"width": 32}, "seed": 3}
    assert data == {"name": "a", "train": {"lr": 1.0}}  # input untouched
    assert "'name' in c.yaml is 'a' (str), not a section" in error_of(
        apply_overrides, data, ["name.x=1"], source="c.yaml"
    )


def test_overrides_typed_and_nested():
    cfg = from_dict(
        Root,
        {"name": "a"},
        overrides=["train.lr=3e-4", "train.compile=true", "model.depths=[4,4,4]", "train.resume_from=r/1"],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.compile is True
    assert cfg.model.depths == [4, 4, 4]
    assert cfg.model.width == 128  # rest of the default section kept
    assert cfg.train.resume_from == Path("r/1")


def test_override_errors_name_the_override():
    msg = error_of(from_dict, Root, {"name": "a"}, source="c.yaml", overrides=["train.lrr=1"])
    assert msg.startswith("--set train.lrr=1: unknown key 'train.lrr' (did you mean 'train.lr'?)")
    msg = error_of(from_dict, Root, {"name": "a"}, source="c.yaml", overrides=["train.steps=abc"])
    assert msg == "--set train.steps=abc: train.steps: expected int, got 'abc' (str)"
    # an error in the file is still blamed on the file
    data = {"name": "a", "train": {"stepz": 1}}
    msg = error_of(from_dict, Root, data, source="c.yaml", overrides=["train.lr=1"])
    assert msg.startswith("c.yaml: unknown key 'train.stepz' (did you mean 'train.steps'?)")


def test_to_dict_round_trip():
    cfg = from_dict(
        Root,
        {"name": "a", "seed": 1, "train": {"resume_from": "r", "milestones": [5], "loss_weights": {"m": 2}}},
    )
    plain = to_dict(cfg)
    assert plain["train"]["resume_from"] == "r"
    assert plain["train"]["betas"] == [0.9, 0.99]
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # YAML-safe
    assert from_dict(Root, yaml.safe_load(yaml.safe_dump(plain))) == cfg


def test_load_config_from_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("name: tiny\ntrain:\n  lr: 3e-4\n  steps: 10\nmodel:\n  kind: unet\n")
    cfg = load_config(Root, path, overrides=["train.steps=20"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 20
    assert cfg.model == Model(kind="unet", width=128)
    msg = error_of(load_config, Root, path, ["train.lrr=1"])
    assert "--set train.lrr=1: unknown key 'train.lrr' (did you mean 'train.lr'?)" in msg


def test_load_config_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error_of(load_config, Root, missing) == f"{missing}: no such file (expected a config file)"

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: a\ntrain:\n  lr: [1, 2\n  steps: 3\n")
    msg = error_of(load_config, Root, broken)
    assert msg.startswith(f"{broken}:") and "invalid YAML" in msg
    assert msg.split(":")[1].isdigit()  # line number

    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert "expected a mapping" in error_of(load_config, Root, listed)

    typo = tmp_path / "typo.yaml"
    typo.write_text("name: a\ntrain:\n  lrr: 1\n")
    assert error_of(load_config, Root, typo).startswith(f"{typo}: unknown key 'train.lrr'")

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "missing required key 'name'" in error_of(load_config, Root, empty)


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    from vgen.families.config import load_train_config

    from vgen.families import FAMILIES

    cfg = load_train_config(path)
    assert cfg.kind in FAMILIES
