"""The command line behaves like its peers: help everywhere, overrides anywhere, one-line errors."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dinov2_repro.cli import build_parser, main, parse_args

ROOT = Path(__file__).resolve().parents[1]


def _all_command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths += _all_command_paths(child, (*prefix, name))
    return paths


def test_every_verb_and_sub_verb_answers_help(capsys: pytest.CaptureFixture) -> None:
    paths = _all_command_paths(build_parser())
    assert {("train",), ("curate",), ("eval", "knn"), ("eval", "landcover"), ("export",)} <= set(paths)
    for path in paths:
        with pytest.raises(SystemExit) as exit_:
            main([*path, "--help"])
        assert exit_.value.code == 0, path
        assert "usage: dinov2-repro" in capsys.readouterr().out


def test_bare_command_lists_the_verbs(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in ("train", "curate", "eval", "export", "demo", "info"))


def test_overrides_anywhere_on_the_line_keep_their_order() -> None:
    parser = build_parser()
    args = parse_args(parser, ["train", "a.b=1", "--config", "vit_tiny_cpu", "c=2", "--nproc", "2", "a.b=3"])
    assert args.config_file == "vit_tiny_cpu" and args.nproc == 2
    assert args.overrides == ["a.b=1", "c=2", "a.b=3"]
    args = parse_args(parser, ["curate", "all", "--config-file", "configs/curation/demo.yaml", "output_dir=runs/x"])
    assert (args.stage, args.overrides) == ("all", ["output_dir=runs/x"])
    with pytest.raises(SystemExit):
        parse_args(parser, ["info", "a=1"])  # a verb without a config takes no overrides
    with pytest.raises(SystemExit):
        parse_args(parser, ["train", "not-an-override"])


def test_a_wrong_key_is_one_line_naming_the_closest_key(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--config-file", "vit_tiny_cpu", "train.dataset_pth=x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.dataset_pth" in err[0] and "train.dataset_path" in err[0]
    assert main(["curate", "tile", "--config", "no_such_recipe"]) == 2
    assert "demo" in capsys.readouterr().err  # names the shipped curation recipes


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinov2_repro.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


@pytest.mark.slow
def test_user_mistakes_are_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    line = ["train", "--config-file", "vit_tiny_cpu.yaml", f"train.output_dir={tmp_path / 'run'}",
            f"train.dataset_path=ImageFolder:root={missing}"]
    done = _cli(*line)
    assert done.returncode == 2
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and str(missing) in message[0] and "train.dataset_path" in message[0], done.stderr
    assert "Traceback" not in done.stderr
    debug = _cli(*line, DINOV2_REPRO_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
