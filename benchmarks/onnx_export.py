"""ONNX export of full-size small backbones: export time, file size, onnxruntime vs torch agreement
and CPU latency, measured side by side in one run.

    PYTHONPATH=. python benchmarks/onnx_export.py --out benchmarks/results/onnx_export_cpu.json

Models: ViT-S/14 with 4 registers (the released register models' antialiased pos-embed
resampling) and the DINOv3 ViT-S/16 (RoPE), random weights with visible tokens and LayerScale.
Each is exported with dynamic batch and size at 224 px; the check covers 224 px and another size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone import machine_description  # noqa: E402

from dinov2_repro.io.files import atomic_write_text  # noqa: E402
from dinov2_repro.models import DinoV3VisionTransformer, DinoVisionTransformer  # noqa: E402
from dinov2_repro.onnx_export.backbone import BackboneTokens, export_backbone_onnx  # noqa: E402
from dinov2_repro.onnx_export.graph import onnxruntime_session  # noqa: E402


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    models = {
        "vit_small_p14_reg4": DinoVisionTransformer(img_size=224, patch_size=14, embed_dim=384, depth=12, num_heads=6,
                                                    num_register_tokens=4, interpolate_antialias=True,
                                                    interpolate_offset=0.0),
        "dinov3_vit_small_p16": DinoV3VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12,
                                                        num_heads=6, num_register_tokens=4),
    }
    with torch.no_grad():
        for model in models.values():
            for name, param in model.named_parameters():
                if name.endswith(("pos_embed", "cls_token", "register_tokens")):
                    param.normal_(0.0, 0.5)
                elif name.endswith("gamma"):
                    param.uniform_(0.5, 1.5)
            model.eval()
    return models


def _latency(run, repeats: int) -> float:
    run()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_export_cpu.json"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {"machine": machine_description(torch.device("cpu")), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in _models().items():
            path = Path(tmp) / f"{name}.onnx"
            start = time.perf_counter()
            report = export_backbone_onnx(model, path, header={"arch": name, "mean": [0.485, 0.456, 0.406],
                                                               "std": [0.229, 0.224, 0.225]}, image_size=(224, 224))
            export_s = time.perf_counter() - start  # includes the onnxruntime check
            session = onnxruntime_session(path, threads=torch.get_num_threads())  # same threads as torch
            images = torch.randn(1, 3, 224, 224)
            module = BackboneTokens(model).eval()
            with torch.no_grad():
                torch_s = _latency(lambda: module(images), args.repeats)
            feed = {"images": images.numpy()}
            ort_s = _latency(lambda: session.run(None, feed), args.repeats)
            results["models"][name] = {
                "parameters": sum(p.numel() for p in model.parameters()),
                "export_and_check_s": round(export_s, 1),
                "file_mb": round(os.path.getsize(path) / 1e6, 1),
                "checks": report["checks"], "max_abs_diff": report["max_abs_diff"],
                "latency_batch1_224px_s": {"torch": round(torch_s, 4), "onnxruntime": round(ort_s, 4),
                                           "onnxruntime_over_torch": round(ort_s / torch_s, 3)},
            }
            print(name, json.dumps(results["models"][name]["latency_batch1_224px_s"]), report["max_abs_diff"], flush=True)
    results["threads"] = {"torch": torch.get_num_threads(), "onnxruntime": torch.get_num_threads()}
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
