"""Typed options from YAML and dotted flags."""

from dataclasses import dataclass, field

import pytest

from lmforge.cli import main as cli_main
from lmforge.settings import OptionError, format_help, parse_args, parse_args_or_raise


@dataclass
class Optim:
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Stage:
    out_dir: str = "runs/x"
    steps: int = 10
    compile: bool = False
    resume: str | None = None
    data: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)


def test_yaml_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 5\noptim:\n  lr: 1.0e-3\n")
    cfg = parse_args_or_raise(Stage, ["--config", str(tmp_path / "c.yaml"), "--optim.lr", "2e-3", "--compile",
                                      "--data", "a.txt", "b.txt", "--max-steps=3"][:-1])
    assert (cfg.steps, cfg.optim.lr, cfg.compile, cfg.data) == (5, 2e-3, True, ["a.txt", "b.txt"])
    assert parse_args_or_raise(Stage, ["--resume", "none", "--out-dir=o"]).resume is None
    assert parse_args_or_raise(Stage, ["--optim.betas", "0.8,0.9"]).optim.betas == [0.8, 0.9]


@pytest.mark.parametrize("argv,message", [
    (["--optim.lrr", "1"], "unknown option '--optim.lrr'"),
    (["--bogus", "1"], "unknown option '--bogus'"),
    (["--steps", "ten"], "steps: 'ten' is not a valid int"),
    (["--steps", "1.5"], "steps: '1.5' is not a valid int"),
    (["--compile", "maybe"], "compile: 'maybe' is not a boolean"),
    (["--steps"], "--steps needs a value"),
])
def test_bad_flags_name_the_key(argv, message):
    with pytest.raises(OptionError, match=message):
        parse_args_or_raise(Stage, argv)


def test_bad_yaml_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(OptionError, match=r"unknown option 'optim\.learning_rate' in .*bad\.yaml"):
        parse_args_or_raise(Stage, ["--config", str(path)])
    path.write_text("steps: [1, 2]\n")
    with pytest.raises(OptionError, match=r"steps: .* in .*bad\.yaml"):
        parse_args_or_raise(Stage, ["--config", str(path)])


def test_help_lists_every_option_with_default(capsys):
    text = format_help(Stage, "lmforge stage")
    for flag in ("--out-dir", "--steps", "--compile", "--resume", "--data", "--optim.lr", "--optim.betas"):
        assert flag in text
    assert "(default: 0.0003)  peak learning rate" in text
    with pytest.raises(SystemExit) as e:
        parse_args(Stage, ["--bogus"], prog="lmforge stage")
    assert e.value.code == 2
    assert "unknown option '--bogus'" in capsys.readouterr().err


def test_cli_unknown_command(capsys):
    assert cli_main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli_main(["--help"]) == 0
    assert "quickstart" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_resume_alias(tmp_path, stage, capsys):
    """`--resume auto` (and a top-level `resume:` in YAML) set train.resume, as the issue's commands write it."""
    from lmforge.train.pretrain import PretrainConfig
    from lmforge.train.sft import SFTConfig

    cls = {"pretrain": PretrainConfig, "sft": SFTConfig}[stage]
    assert parse_args_or_raise(cls, ["--resume", "auto"]).train.resume == "auto"
    assert parse_args_or_raise(cls, ["--resume=runs/x/checkpoint-000002"]).train.resume == "runs/x/checkpoint-000002"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("resume: auto\ntrain:\n  steps: 7\n")
    cfg = parse_args_or_raise(cls, ["--config", str(recipe)])
    assert (cfg.train.resume, cfg.train.steps) == ("auto", 7)
    assert "--resume  the same as --train.resume" in format_help(cls, "lmforge " + stage)
    with pytest.raises(OptionError, match="unknown option '--resumes'"):
        parse_args_or_raise(cls, ["--resumes", "auto"])
