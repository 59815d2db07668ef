"""The demo's ``REPORT.md``: results table, loss curves and every figure, in one markdown file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io.files import atomic_write_text
from .visualize import pyplot, save_figure


def plot_loss_curves(runs: Mapping[str, Path], path: str | os.PathLike) -> Path | None:
    """total_loss vs iteration of each run directory's metrics.jsonl (runs without one are skipped)."""
    curves = {}
    for name, run_dir in runs.items():
        log = Path(run_dir) / "metrics.jsonl"
        if not log.is_file():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        points = [(r["iteration"], r["total_loss"]) for r in rows if "iteration" in r and "total_loss" in r]
        if points:
            curves[name] = points
    if not curves:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
    for axis, (name, points) in zip(axes[0], curves.items()):
        axis.plot([p[0] for p in points], [p[1] for p in points])
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("iteration")
        axis.set_ylabel("total loss")
        axis.grid(alpha=0.3)
    return save_figure(figure, path)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def results_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table; missing cells print as '-'."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(column)) for column in columns) + " |")
    return "\n".join(lines)


def write_report(path: Path, *, title: str, sections: Sequence[tuple[str, str]], figures: Sequence[tuple[str, Path]]) -> Path:
    """Markdown with text sections, then every figure (linked relative to the report)."""
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.strip(), ""]
    parts += ["## Figures", ""]
    for caption, figure in figures:
        if figure is not None and Path(figure).is_file():
            relative = os.path.relpath(figure, path.parent)
            parts += [f"### {caption}", "", f"![{caption}]({relative})", ""]
    atomic_write_text(path, "\n".join(parts))
    return path
