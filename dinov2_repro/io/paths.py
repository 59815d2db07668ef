"""The one rule for every verb that writes: an output never replaces one of the command's inputs.

A map written with ``--out`` equal to ``--scene`` would destroy the user's scene (the atomic
write succeeds, silently). Every verb calls :func:`refuse_overwriting_inputs` with its outputs
and inputs before any work; the error names both options and the shared file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from ..config import ConfigError

PathLike = str | os.PathLike


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are one file: equal once resolved (symlinks, ``..``), or the same
    inode (hard links, bind mounts) when both exist."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _named(items: Mapping[str, PathLike | Iterable[PathLike] | None]) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for name, value in items.items():
        if value is None:
            continue
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        out += [(name, Path(v)) for v in values if v is not None and str(v) != ""]
    return out


def refuse_overwriting_inputs(*, outputs: Mapping[str, PathLike | Iterable[PathLike] | None],
                              inputs: Mapping[str, PathLike | Iterable[PathLike] | None]) -> None:
    """Raise ConfigError if an output resolves to an input file, or two outputs to one file.

    ``outputs`` / ``inputs`` map an option name (used in the message, e.g. ``"--out"``) to a path,
    a list of paths or None (option not given). Inputs that are dataset specs rather than paths
    simply never match.
    """
    named_outputs, named_inputs = _named(outputs), _named(inputs)
    for out_name, out_path in named_outputs:
        for in_name, in_path in named_inputs:
            if _same_file(out_path, in_path):
                raise ConfigError(f"{out_name} {out_path} is the input {in_name} {in_path}: refusing to overwrite an "
                                  f"input; choose another output path")
    for i, (name_a, path_a) in enumerate(named_outputs):
        for name_b, path_b in named_outputs[i + 1:]:
            if _same_file(path_a, path_b):
                raise ConfigError(f"{name_a} {path_a} and {name_b} {path_b} are the same file; give them different paths")


def files_in(folder: PathLike | None) -> list[Path]:
    """The files directly inside ``folder`` (inputs given as a run directory); [] if it is not one."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if p.is_file())
