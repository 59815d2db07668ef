"""Distillation benchmark: one job with 2 students vs two 1-student jobs on the same data.

    python benchmarks/distill.py [--quick] [--rounds N] [--output-dir DIR]

A random-weight teacher checkpoint is written by a 1-iteration pretraining run (wall time does
not depend on the weights). Then, per round, three `dinov2-repro distill` jobs run as
subprocesses, in an order that rotates every round so drifting machine load hits all alike:
students [A, B] together, A alone, B alone; same data, seed and iterations. Reported: median
job wall time (process start to exit, as a user sees it) and median training time from the
loop's own images/s (start-up excluded), and the saving of the shared job against the sum of
the two single jobs. Writes ``<output-dir>/distill_cpu.json`` and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import torch  # noqa: E402

from backbone import machine_description  # noqa: E402
from dinov2_repro.data.sample_data import write_demo_image_folder  # noqa: E402
from dinov2_repro.train.metrics import read_metrics  # noqa: E402


def settings(quick: bool) -> dict:
    if quick:
        return dict(teacher="vit_micro", students=("vit_micro", "vit_micro"), iterations=3, batch=4, local_crops=2)
    # Sized for a shared 2-core machine: the teacher costs about as much per batch as both students.
    return dict(teacher="vit_tiny", students=("vit_micro", "vit_micro"), iterations=4, batch=8, local_crops=4)


def _cli(*args: str) -> float:
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "dinov2_repro.cli", *args], check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def _train_seconds(run_dir: Path, iterations: int, batch: int) -> float:
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    return iterations * batch / last["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: micro models, 3 iterations")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    s = settings(args.quick)
    machine = machine_description(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = write_demo_image_folder(tmp / "images", tile=56)
        common = [f"train.dataset_path=ImageFolder:root={images}", "train.tensorboard=false", "train.num_workers=1",
                  f"train.batch_size_per_gpu={s['batch']}", f"crops.local_crops_number={s['local_crops']}"]
        _cli("train", "--config-file", str(REPO / "configs/train/vit_tiny_cpu.yaml"), *common,
             f"student.arch={s['teacher']}", "train.max_iterations=1", f"train.output_dir={tmp / 'teacher'}")
        a, b = s["students"]
        jobs = {"two_students": f"[{a},{{arch: {b}, name: b}}]", "student_a": f"[{a}]", "student_b": f"[{{arch: {b}, name: b}}]"}
        wall: dict[str, list[float]] = {k: [] for k in jobs}
        train_s: dict[str, list[float]] = {k: [] for k in jobs}
        order = list(jobs)
        for round_index in range(args.rounds):
            for name in order[round_index % 3:] + order[: round_index % 3]:
                run_dir = tmp / f"{name}_{round_index}"
                wall[name].append(_cli("distill", "--config-file", str(REPO / "configs/distill/tiny_cpu.yaml"),
                                       "--teacher", str(tmp / "teacher"), *common, f"distill.students={jobs[name]}",
                                       f"train.max_iterations={s['iterations']}", f"train.output_dir={run_dir}"))
                train_s[name].append(_train_seconds(run_dir, s["iterations"], s["batch"]))
    median = {k: statistics.median(v) for k, v in wall.items()}
    median_train = {k: statistics.median(v) for k, v in train_s.items()}
    separate = median["student_a"] + median["student_b"]
    separate_train = median_train["student_a"] + median_train["student_b"]
    result = {
        "benchmark": "distill: one 2-student job vs two 1-student jobs",
        "settings": {**s, "rounds": args.rounds, "crops": "2 x 56 px global + local 28 px", "precision": "fp32"},
        "machine": machine,
        "note": "measured on a shared 2-core machine under contention from other jobs (see load_average_at_start); "
                "absolute times are pessimistic, the ratio is the figure of interest",
        "wall_s": {"samples": wall, "median": median, "two_single_jobs_sum": separate,
                   "saving_fraction": 1 - median["two_students"] / separate},
        "train_s": {"samples": train_s, "median": median_train, "two_single_jobs_sum": separate_train,
                    "saving_fraction": 1 - median_train["two_students"] / separate_train},
    }
    out = Path(args.output_dir) / "distill_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
