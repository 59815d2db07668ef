"""Slurm's compressed host and task lists: ``gpu[01-03,07],login`` -> host names,
``2(x3),1`` -> per-node task counts (moved out of ``env.py`` unchanged)."""
from __future__ import annotations

import re
import shutil
import subprocess


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's compressed per-node task counts, e.g. ``"2(x3),1"`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE={spec!r} (part {part!r})")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,3],b`` -> [``a[1,3]``, ``b``]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {nodelist!r}")
        elif char == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in node list {nodelist!r}")
    parts.append(nodelist[start:])
    return [p for p in parts if p]


def _expand_range_list(ranges: str, nodelist: str) -> list[str]:
    values: list[str] = []
    for item in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if match is None:
            raise ValueError(f"cannot parse range {item!r} in node list {nodelist!r}")
        low, high = match.group(1), match.group(2)
        if high is None:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {item!r} in node list {nodelist!r}")
        # Zero padding follows the lower bound, as Slurm writes it: node[08-10].
        values.extend(f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1))
    return values


def parse_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list such as ``gpu[01-03,07],cpu-a[1-2]x[5-6],login``."""
    hosts: list[str] = []
    for group in _split_top_level(nodelist.strip()):
        names = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", group):
            names = [n + literal for n in names]
            if ranges:
                names = [n + v for n in names for v in _expand_range_list(ranges, nodelist)]
        hosts.extend(names)
    if not hosts:
        raise ValueError(f"empty Slurm node list {nodelist!r}")
    return hosts


def first_host(nodelist: str) -> str:
    """First host of a node list: the parser, else ``scontrol show hostnames`` for forms it does not know."""
    try:
        return parse_nodelist(nodelist)[0]
    except ValueError as parse_error:
        scontrol = shutil.which("scontrol")
        if scontrol is None:
            raise
        result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        lines = result.stdout.split()
        if result.returncode != 0 or not lines:
            raise ValueError(f"cannot expand Slurm node list {nodelist!r}: {parse_error}; scontrol: {result.stderr.strip()}") from None
        return lines[0]
