"""Every ``dinov2-repro`` command line the READMEs and the docs show must work as written.

Commands are found generically (fenced code blocks and inline code of README.md,
data_curation/README.md and every page under docs/), so a section or page added later is covered
without touching this file.
Cheap commands run for real; those of the verbs in EXPENSIVE_VERBS are dry-run: the line is
parsed by the real CLI parser (flags, sub-verbs, overrides anywhere) and its config is loaded
and validated (every key, every type) the way the verb would, without training or curating.
"""
from __future__ import annotations

import functools
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "data_curation" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Verbs that take minutes or need data a reader supplies: dry-run instead of run.
# (tests/test_newcomer.py runs the README's CPU quick starts for real.)
EXPENSIVE_VERBS = {"train", "curate", "demo", "export", "eval", "distill", "predict", "plan", "import-weights", "embed"}
FENCE = re.compile(r"```(?!text)[a-z]*\n(.*?)```", re.S)  # ```text blocks show output, not commands
INLINE = re.compile(r"`(dinov2-repro(?: [^`]*)?)`")


def readme_commands() -> list[tuple[str, str]]:
    """(README name, command line) for each ``dinov2-repro`` line, in order, without duplicates."""
    found: list[tuple[str, str]] = []
    for readme in READMES:
        if not readme.is_file():
            continue
        text = readme.read_text(encoding="utf-8")
        lines = []
        for block in FENCE.findall(text):
            lines += [line.strip() for line in block.replace("\\\n", " ").splitlines()]
        without_blocks = FENCE.sub("", text)
        lines += INLINE.findall(without_blocks)
        for line in lines:
            name = readme.relative_to(ROOT).as_posix()
            if line.startswith("dinov2-repro") and (name, line) not in found:
                found.append((name, line))
    return found


PLACEHOLDER = re.compile(r"<[^<>]+>")  # e.g. configs/train/<experiment>.yaml, --teacher <backbone file>: the reader's value


ALTERNATIVES = re.compile(r"[a-z][a-z_-]*(?:\|[a-z][a-z_-]*)+")  # `curate tile|embed|...`: one of these words


def _argv(line: str) -> list[str]:
    argv = shlex.split(PLACEHOLDER.sub("PLACEHOLDER", os.path.expandvars(line)), comments=True)[1:]
    argv = [token.split("|")[0] if ALTERNATIVES.fullmatch(token) else token for token in argv]
    # Prose names a verb on its own (`dinov2-repro export`): that verb must at least answer --help.
    if argv and len(argv) <= 2 and all(re.fullmatch(r"[a-z][a-z_-]*", token) for token in argv):
        argv.append("--help")
    return argv


def _validate_config(args) -> None:
    """Load the config the verb would load: unknown keys and wrong types fail here."""
    from dinov2_repro.config import load_config, resolve_config_file

    from dinov2_repro.distill.config import merge_distill_config
    from dinov2_repro.plan.distill import is_distill_config

    distill_plan = args.verb == "plan" and is_distill_config(args.config_file)
    if args.verb == "train" or (args.verb == "plan" and not distill_plan):
        load_config(resolve_config_file(args.config_file, recipes="train"), args.overrides)
    elif args.verb == "distill" or distill_plan:
        # Keys, types and the students of the distill recipe (the teacher checkpoint is the reader's).
        merge_distill_config(args.config_file, args.overrides)
        if distill_plan and args.teacher_config:
            load_config(resolve_config_file(args.teacher_config, recipes="train"))
    elif args.verb == "curate":
        from dinov2_repro.curation.config import load_curation_config

        load_curation_config(resolve_config_file(args.config_file, recipes="curation"), args.overrides)


@functools.lru_cache(maxsize=None)
def _run_cli(argv: tuple[str, ...]) -> tuple[int, str]:
    """Run a cheap command (help, info) once, however many pages show it: through the CLI's own
    entry point in this process (a subprocess per line would mostly time torch's import)."""
    import contextlib
    import io

    from dinov2_repro.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # --help
            code = exit_.code or 0
    return int(code), err.getvalue()


COMMANDS = readme_commands()


def test_the_readmes_show_commands() -> None:
    verbs = {_argv(line)[0] for _, line in COMMANDS if _argv(line)}
    assert {"train", "curate", "eval", "export"} <= verbs, verbs  # the parser found the examples


@pytest.mark.parametrize("readme,line", COMMANDS, ids=[line[:70] for _, line in COMMANDS])
def test_readme_command(readme: str, line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = _argv(line)
    monkeypatch.chdir(ROOT)  # README paths are relative to the repository root
    from dinov2_repro.cli import build_parser, parse_args

    is_help = bool({"-h", "--help"} & set(argv))
    if not argv or is_help or argv[0] not in EXPENSIVE_VERBS:
        returncode, stderr = _run_cli(tuple(argv))
        assert returncode == 0, f"{readme}: `{line}` failed:\n{stderr[-2000:]}"
        return
    try:
        args = parse_args(build_parser(), argv)
    except SystemExit as exit_:
        pytest.fail(f"{readme}: `{line}` is rejected by the CLI parser (exit {exit_.code})")
    assert getattr(args, "run", None) is not None, f"{readme}: `{line}` names no runnable verb"
    if not PLACEHOLDER.search(line):
        _validate_config(args)


LAYOUT_PAGE = ROOT / "docs" / "development.md"


def test_layout_section_matches_the_tree() -> None:
    """Every path the Layout table of docs/development.md names exists, and every package folder is named."""
    text = LAYOUT_PAGE.read_text(encoding="utf-8")
    section = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    named: set[Path] = set()
    for row in section.splitlines():
        tokens = re.findall(r"`([\w./-]+(?:/|\.py|\.yaml|\.ini))`", row)
        if not tokens:
            continue
        first = ROOT / tokens[0]
        base = first if first.is_dir() else first.parent
        for token in tokens:
            found = next((p for p in (ROOT / token, base / token) if p.exists()), None)
            assert found is not None, f"docs/development.md Layout names {token!r} (row: {row[:60]}...) but it does not exist"
            named.add(found.resolve())
    folders = [p for p in (ROOT / "dinov2_repro").iterdir() if (p / "__init__.py").is_file() or p.name == "configs"]
    unnamed = [p.name for p in folders if p.resolve() not in named]
    assert not unnamed, f"docs/development.md Layout does not name dinov2_repro/{unnamed}"
