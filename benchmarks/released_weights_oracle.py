"""Oracle of the released-weights readers against timm, at every released size, full depth.

    python benchmarks/released_weights_oracle.py [--cases vits14,vitl16,vith16plus@8,...] [--output-dir DIR]

For each case a random timm model (vit_*_patch14_dinov2[.reg4], vit_*_patch16_dinov3[_qkvb]) is
written in the official layout (tests/released_weights_helpers.py inverts timm's filters) and
as a timm safetensors file; both are read through ``load_backbone`` and CLS, patch tokens and
three normed intermediate layers are compared with timm's forward on one image (2x3 patches;
DINOv2 pos-embed resampled with timm's convention, see tests/test_released_weights.py). ViT-g
and ViT-7B are checked by key sets and shapes on the meta device (too big for CPU memory here).
Writes ``<output-dir>/released_weights_oracle.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from released_weights_helpers import DINOV2_CASES, DINOV3_CASES  # noqa: E402
from test_released_weights import dinov2_oracle, dinov3_oracle, test_giant_and_7b_keys_and_shapes_on_meta  # noqa: E402

from dinov2_repro.io.files import atomic_write_json  # noqa: E402

CPU_CASES = [c for c in [*DINOV2_CASES, *DINOV3_CASES] if not c.startswith(("vitg14", "vit7b16"))]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import timm

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": cpu,
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "timm": timm.__version__, "device": "cpu", "load_average_at_start": list(os.getloadavg())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CPU_CASES))
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--fresh", action="store_true", help="drop the cases of an existing result file "
                        "(by default they are kept and the ones run now replace theirs)")
    args = parser.parse_args()
    out = Path(args.output_dir) / "released_weights_oracle.json"
    result = {"benchmark": "released_weights_oracle", "machine": machine(), "tolerance": 1e-5,
              "settings": {"precision": "fp32", "depth": "full (released)", "weights": "random (randomize_)",
                           "input": "1 image, 2x3 patches (28x42 px DINOv2, 32x48 px DINOv3)",
                           "compared": "CLS, patch tokens, normed intermediate layers (first, middle, last block)",
                           "routes": "pth: official layout via load_backbone; timm: timm safetensors via load_backbone"},
              "cases": {}}
    if out.is_file() and not args.fresh:
        result["cases"] = json.loads(out.read_text())["cases"]
    for entry in args.cases.split(","):
        # "case@N": the released width and block kind at N blocks (for sizes whose full depth
        # does not fit the machine's memory three times over).
        case, _, depth = entry.partition("@")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            run = dinov2_oracle if case in DINOV2_CASES else dinov3_oracle
            diffs = run(case, Path(folder), depth=int(depth) if depth else None)
        name = (DINOV2_CASES.get(case) or DINOV3_CASES[case])[0]
        result["cases"][entry] = {"timm_model": name, "depth": int(depth) if depth else "full",
                                 "max_abs_diff_pth": diffs["pth"], "max_abs_diff_timm": diffs["timm"],
                                 "cls": diffs["pth_cls"], "patch": diffs["pth_patch"],
                                 "intermediate": diffs["pth_intermediate"], "pass": max(diffs["pth"], diffs["timm"]) <= 1e-5,
                                 "seconds": round(time.perf_counter() - start, 1),
                                 "load_average_1min": round(os.getloadavg()[0], 1)}
        print(entry, result["cases"][entry], flush=True)
    for family, cases in (("dinov2", ["vitg14", "vitg14_reg4"]), ("dinov3", ["vit7b16", "vit7b16_sat"])):
        test_giant_and_7b_keys_and_shapes_on_meta(family, cases)  # raises on a mismatch
        for case in cases:
            result["cases"][case] = {"timm_model": (DINOV2_CASES.get(case) or DINOV3_CASES[case])[0],
                                     "check": "key sets and shapes on the meta device", "pass": True}
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0 if all(c["pass"] for c in result["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
