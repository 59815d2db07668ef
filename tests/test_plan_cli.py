"""`dinov2-repro plan` and `train --dry-run` on a micro config: outputs, fit verdicts, user errors."""
from __future__ import annotations

import json

import pytest

from dinov2_repro.cli import main
from dinov2_repro.config import CONFIG_DIR

TINY = str(CONFIG_DIR / "train" / "vit_tiny_cpu.yaml")
MICRO = ["student.arch=vit_micro", "crops.global_crops_size=28", "crops.local_crops_size=14", "crops.local_crops_number=2",
         "train.batch_size_per_gpu=4", *[f"{k}.head_n_prototypes=64" for k in ("dino", "ibot")]]


def test_plan_writes_json_and_table(tmp_path, capsys, one_torch_thread):
    out = tmp_path / "plan.json"
    code = main(["plan", "--config-file", TINY, "--nodes", "1", "--gpus-per-node", "2", "--gpu", "custom:100,1",
                 "--mfu", "0.5", "--out", str(out), *MICRO])
    assert code == 0
    plan = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "peak" in printed and "GPU-hours" in printed
    assert plan["world_size"] == 2 and plan["global_batch"] == 8 and plan["fits"] is True
    flops = plan["flops_per_gpu_step"]
    assert flops["total"] == flops["student_forward"] + flops["student_backward"] + flops["teacher_forward"]
    assert plan["flops_per_step"] == 2 * flops["total"]
    # Step time follows from the FLOPs, the peak throughput and the MFU given.
    assert plan["step_time_s"] == pytest.approx(flops["total"] / (100e12 * 0.5))
    assert plan["gpu_hours"] == pytest.approx(plan["step_time_s"] * plan["iterations"] * 2 / 3600)
    memory = plan["memory_bytes"]
    assert memory["peak"] >= memory["persistent"] + memory["activations_end_of_forward"] > 0


@pytest.mark.slow
def test_plan_says_what_would_fit(tmp_path, one_torch_thread):
    out = tmp_path / "plan.json"
    # 5 MB of GPU: the step does not fit; the planner must name remedies and check them.
    main(["plan", "--config-file", TINY, "--gpus-per-node", "1", "--gpu", "custom:100,0.005", "--mfu", "0.5",
          "--out", str(out), *MICRO])
    plan = json.loads(out.read_text())
    assert plan["fits"] is False
    changes = {remedy["change"].split("=")[0] for remedy in plan["remedies"]}
    assert "train.activation_checkpointing" in changes
    checkpointed = next(r for r in plan["remedies"] if r["change"].startswith("train.activation_checkpointing"))
    assert checkpointed["how"] == "traced" and checkpointed["peak_bytes"] <= plan["memory_bytes"]["peak"]
    assert all(remedy["fits"] is False for remedy in plan["remedies"])  # nothing makes 28 MB fit in 5 MB


@pytest.mark.parametrize("gpu, message", [("v100", "unknown"), ("custom:abc", "custom:TFLOPS,GB")])
def test_plan_rejects_unknown_gpu(tmp_path, capsys, gpu, message):
    code = main(["plan", "--config-file", TINY, "--gpu", gpu, "--out", str(tmp_path / "p.json")])
    assert code != 0
    assert message in capsys.readouterr().err


def test_train_dry_run_prints_submitit_parameters_and_plan(tmp_path, capsys, monkeypatch, one_torch_thread):
    from dinov2_repro.launch import slurm as slurm_launcher

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(slurm_launcher, "submit_slurm", lambda *a, **k: pytest.fail("dry run submitted a job"))
    code = main(["train", "--config-file", TINY, "--launcher", "slurm", "--nodes", "2", "--gpus-per-node", "2",
                 "--partition", "gpu", "--dry-run", "--plan-gpu", "h100-80gb", "--plan-mfu", "0.4", *MICRO])
    assert code == 0
    printed = capsys.readouterr().out
    launch_json = json.loads(printed[: printed.index("\n}\n") + 3])
    params = launch_json["submitit_parameters"]
    assert params["nodes"] == 2 and params["tasks_per_node"] == 2 and params["gpus_per_node"] == 2
    assert params["slurm_partition"] == "gpu"
    assert "4 x h100-80gb" in printed and "nothing was launched" in printed
    assert not (tmp_path / "slurm_logs").exists()


DISTILL = str(CONFIG_DIR / "distill" / "tiny_cpu.yaml")


def test_plan_distill_needs_a_teacher_config(tmp_path, capsys):
    code = main(["plan", "--config-file", DISTILL, "--out", str(tmp_path / "p.json")])
    assert code != 0
    assert "--teacher-config" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_distill_traces_teacher_once_and_every_student(tmp_path, one_torch_thread):
    def plan(students: str) -> dict:
        out = tmp_path / f"{students}.json"
        main(["plan", "--config-file", DISTILL, "--teacher-config", TINY, "--gpus-per-node", "1", "--mfu", "0.5",
              "--out", str(out), f"distill.students={students}", *MICRO[1:]])
        return json.loads(out.read_text())["flops_per_gpu_step"]

    one, two = plan("[vit_micro]"), plan("[{arch: vit_micro, name: a},{arch: vit_micro, name: b}]")
    # One teacher forward for any number of students; student work adds up per student.
    assert two["teacher_forward"] == one["teacher_forward"] > 0
    assert two["student_forward"] == 2 * one["student_forward"]
    assert two["student_backward"] == 2 * one["student_backward"]


def test_plan_says_where_the_default_mfu_comes_from(tmp_path, capsys, monkeypatch, one_torch_thread):
    """The default MFU is the paper's GPU-hours rearranged: the plan says so (no trace of ViT-g here:
    the anchor's FLOPs are stubbed), and --mfu is reported as given."""
    from dinov2_repro.plan import report
    from dinov2_repro.plan.hardware import GPUS, PAPER

    anchor_flops = 5e13
    monkeypatch.setattr(report, "paper_mfu", lambda: (PAPER.mfu(anchor_flops), anchor_flops))
    out = tmp_path / "plan.json"
    assert main(["plan", "--config-file", TINY, "--gpus-per-node", "1", "--gpu", "custom:100,1", "--out", str(out), *MICRO]) == 0
    plan, printed = json.loads(out.read_text()), capsys.readouterr().out
    assert plan["mfu_source"] == "paper" and plan["paper_anchor"]["traced_flops_per_gpu_step"] == anchor_flops
    assert "assumed, not measured" in plan["mfu_origin"] and "22,016" in plan["mfu_origin"] and "--mfu" in plan["mfu_origin"]
    assert plan["mfu_origin"] in printed and "confirm" not in printed.lower()
    # By construction: at that MFU the anchor's own step takes exactly the paper's GPU-hours.
    seconds = anchor_flops / (GPUS[PAPER.gpu].peak_tflops * 1e12 * plan["mfu"])
    assert seconds * PAPER.iterations * PAPER.gpus / 3600 == pytest.approx(PAPER.gpu_hours)
    assert main(["plan", "--config-file", TINY, "--gpus-per-node", "1", "--gpu", "custom:100,1", "--mfu", "0.5",
                 "--out", str(out), *MICRO]) == 0
    assert json.loads(out.read_text())["mfu_origin"] == "given with --mfu"


@pytest.mark.slow
def test_plan_says_what_another_global_batch_changes(tmp_path, capsys, one_torch_thread):
    """2 GPUs x 4 images = 8, against a recipe of 16: images seen, the rescaled lr and what would
    keep the recipe are printed; with accumulation the plan's global batch is the recipe's."""
    out = tmp_path / "plan.json"
    common = ["plan", "--config-file", TINY, "--gpus-per-node", "2", "--gpu", "custom:100,1", "--mfu", "0.5",
              "--out", str(out), *MICRO, "train.recipe_global_batch=16", "optim.scaling_rule=sqrt_wrt_1024"]
    assert main(common) == 0
    plan, printed = json.loads(out.read_text()), capsys.readouterr().out
    recipe = plan["recipe_batch"]
    assert recipe["plan_global_batch"] == 8 and recipe["images_seen"] == 8 * plan["iterations"]
    assert recipe["recipe_images_seen"] == 16 * plan["iterations"]
    assert recipe["lr"] == pytest.approx(0.002 * (8 / 1024) ** 0.5) and recipe["recipe_lr"] == pytest.approx(0.002 * (16 / 1024) ** 0.5)
    assert recipe["keep_recipe"][0]["change"] == "train.batch_size_per_gpu=8 train.grad_accumulation=1"
    assert "instead of the recipe's 16" in printed and "keeps the recipe" in printed
    assert main([*common, "train.grad_accumulation=2"]) == 0
    plan = json.loads(out.read_text())
    assert plan["recipe_batch"] is None and plan["global_batch"] == 16
    assert plan["flops_per_step"] == 2 * 2 * plan["flops_per_gpu_step"]["total"]  # 2 GPUs x 2 micro-batches
