"""The documentation: the site builds in strict mode (every link and API page resolves), the
configuration reference matches the default YAML files, the README stays short, and user pages
carry no development history."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.slow
def test_docs_build_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    api_page = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    names = [f"api.{name}" for name in ("train", "distill", "curate", "load_backbone", "eval_seg", "predict_seg", "plan")]
    for name in [*names, "backbone.Backbone.embed", "backbone.Backbone.patch_features"]:
        assert f'id="dinov2_repro.{name}"' in api_page, f"the API page has no generated section for dinov2_repro.{name}"


def test_configuration_reference_is_generated_from_the_defaults() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import config_reference
    finally:
        sys.path.pop(0)
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == config_reference.render(), "docs/configuration.md is stale: run python tools/config_reference.py"
    assert "`train.max_iterations`" in page and "`distill.students`" in page and "`dedup.verify.k`" in page


def test_readme_is_short_and_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for page in ("curation", "pretraining", "scaling-out", "planning", "distillation", "evaluation",
                 "released-weights", "api", "cli", "configuration", "formats", "results", "dependencies"):
        assert f"(docs/{page}.md)" in readme, f"README does not link docs/{page}.md"


# Issue numbers and development history belong in the tracker and the git log, not in user pages.
HISTORY = re.compile(r"\bissue\b|#\d+\b|\bitem[ -]\d\b|\bthis stop\b|\bsession\b", re.I)


@pytest.mark.parametrize("page", ["README.md", "api.md", "cli.md", "configuration.md", "formats.md", "dependencies.md",
                                  "pretraining.md", "scaling-out.md", "planning.md", "distillation.md", "evaluation.md",
                                  "development.md", "results.md", "index.md"])
def test_user_pages_carry_no_development_history(page: str) -> None:
    path = ROOT / page if page == "README.md" else ROOT / "docs" / page
    hits = [line for line in path.read_text(encoding="utf-8").splitlines() if HISTORY.search(line)]
    assert not hits, f"{page}: {hits[:3]}"
