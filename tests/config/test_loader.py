"""The generic config loader: types, unknown keys, overrides, validate(), one error listing every problem."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest
import yaml

from dskd_scale.config import ConfigError, build_config, config_to_dict, load_config, save_config


@dataclasses.dataclass(frozen=True, kw_only=True)
class KD:
    temperature: float = 2.0
    alpha: float = 0.5
    divergence: Literal["forward_kl", "reverse_kl"] = "forward_kl"

    def validate(self) -> list[str]:
        problems = []
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        return problems


@dataclasses.dataclass(frozen=True, kw_only=True)
class Train:
    lr: float
    steps: int = 10
    bf16: bool = False
    tags: list[str] = dataclasses.field(default_factory=list)
    output_dir: Path | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    kd: KD = dataclasses.field(default_factory=KD)
    train: Train


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_typed_tree(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1e-4\n  steps: 3\nkd:\n  temperature: 1\n")
    cfg = load_config(Run, path, ["kd.temperature=4", "train.tags=[a, b]", "train.output_dir=/tmp/x"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 3
    assert cfg.kd.temperature == 4.0 and isinstance(cfg.kd.temperature, float)
    assert cfg.train.tags == ["a", "b"]
    assert cfg.train.output_dir == Path("/tmp/x")
    assert cfg.kd.divergence == "forward_kl"


def test_every_problem_is_listed_once_with_key_path_and_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: fast\n  stepz: 3\nkd:\n  temperature: 0.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(Run, path, ["kd.alpha=1.5", "train.bf16=maybe"])
    problems = info.value.problems
    text = "\n".join(problems)
    assert f"train.lr ({path}:2): expected a number, got 'fast'" in text
    assert "train.stepz" in text and "did you mean 'steps'" in text and f"{path}:3" in text
    assert "train.bf16 (command line): expected true/false" in text
    # train failed to build, kd built: kd's validate() still reports both cross-field problems
    assert any(p.startswith(f"kd.temperature ({path}:5) must be > 0") for p in problems)
    assert any(p.startswith("kd.alpha (command line) must be in [0, 1]") for p in problems)
    assert len(problems) == 5, problems


def test_literal_choices_are_listed():
    with pytest.raises(ConfigError, match=r"kd.divergence: must be one of 'forward_kl', 'reverse_kl', got 'kl'"):
        build_config(Run, {"train": {"lr": 1.0}, "kd": {"divergence": "kl"}})


def test_missing_required_value_is_named():
    with pytest.raises(ConfigError, match=r"train.lr: required, but not set"):
        build_config(Run, {"train": {"steps": 1}})


def test_bad_override_syntax_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        build_config(Run, {"train": {"lr": 1.0}}, ["kd.temperature"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Run, tmp_path / "absent.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = build_config(Run, {"train": {"lr": 0.1, "output_dir": "out", "tags": ["x"]}})
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(Run, tmp_path / "resolved.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text()) == config_to_dict(cfg)


def test_type_errors_and_range_checks_of_one_section_come_in_one_list():
    # kd.alpha is out of range and kd.divergence has a bad type in the same section: both in one error
    with pytest.raises(ConfigError) as info:
        build_config(Run, {"train": {"lr": 1.0}, "kd": {"alpha": 1.5, "divergence": 3, "temperature": "hot"}})
    problems = info.value.problems
    assert any(p.startswith("kd.alpha must be in [0, 1], got 1.5") for p in problems), problems
    assert any(p.startswith("kd.divergence: must be one of") for p in problems), problems
    assert any(p.startswith("kd.temperature: expected a number, got 'hot'") for p in problems), problems
    # the failed temperature is not range-checked again through its stand-in default
    assert len(problems) == 3, problems


def test_run_config_reports_type_errors_and_validate_problems_together():
    from dskd_scale.config.run import RunConfig

    with pytest.raises(ConfigError) as info:
        build_config(RunConfig, {"student": {"architecture": "gpt2", "tokenizer": "tok"},
                                 "teacher": {"architecture": "llama", "tokenizer": "tok"},
                                 "data": {"train_dir": "d"}},
                     ["kd.temperature=abc", "kd.alpha=2", "optim.grad_accum=0", "data.micro_batch_size=x",
                      "engine.precision=fp16"])
    text = "\n".join(info.value.problems)
    assert "kd.temperature (command line): expected a number, got 'abc'" in text
    assert "data.micro_batch_size (command line): expected an integer, got 'x'" in text
    assert "kd.alpha (command line) must be in [0, 1], got 2.0" in text
    assert "optim.grad_accum (command line) must be > 0, got 0" in text
    assert "engine.precision=fp16 with DSKD overflows" in text  # a cross-section check of the root
    assert "temperature must be > 0" not in text and "micro_batch_size must be > 0" not in text
    assert len(info.value.problems) == 5, info.value.problems
