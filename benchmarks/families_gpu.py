"""Every encoder family at full size on a GPU: random weights, bf16 autocast, no Ray or MLflow.

Per encoder: builds on CUDA, embeds a batch (auto pooling), checks the dense map and two
intermediate layers, compares the bf16 embedding with an fp32 pass (cosine) and times `embed()` at
batch 64 (224 px; CONCH at its 448). Needs torch, timm >= 1.0.20, open_clip_torch (+ ftfy) and
transformers; run from the repository root:

    python benchmarks/families_gpu.py [ENCODER ...]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import timm
import torch
import transformers

from tasks.encoders import create_encoder, get_encoder_spec

print("torch", torch.__version__, "timm", timm.__version__, "transformers", transformers.__version__, flush=True)
NAMES = sys.argv[1:] or ["dinov3_vits16", "dinov3_convnext_tiny", "resnet50_trunc", "biomedclip", "conch", "rad_dino",
                         "meddinov3_vitb16", "uni", "medsiglip_448", "uni2_h"]
for name in NAMES:
    t0 = time.time()
    try:
        spec = get_encoder_spec(name)
        r = 448 if name == "conch" else 224
        enc = create_encoder(name, weights="random", device="cuda")
        build_s = time.time() - t0
        x = np.random.default_rng(0).integers(0, 256, (8, 3, r, r), dtype=np.uint8)
        e = enc.embed(x)
        d = enc.dense(x)
        lay = enc.dense(x, layers=[0, -1]) if spec.arch == "vit" else None
        enc.autocast = False
        e32 = enc.embed(x)
        enc.autocast = True
        cos = float(np.mean(np.sum(e * e32, 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(e32, axis=1))))
        xb = np.random.default_rng(1).integers(0, 256, (64, 3, r, r), dtype=np.uint8)
        enc.embed(xb)
        torch.cuda.synchronize()
        t = time.time()
        for _ in range(3):
            enc.embed(xb)
        torch.cuda.synchronize()
        ips = 3 * 64 / (time.time() - t)
        ok = np.isfinite(e).all() and torch.isfinite(d).all() and e.shape == (8, enc.embedding_dim("auto"))
        print(f"{name:20s} ok={ok} r={r} embed={e.shape} dense={tuple(d.shape)} "
              f"layers={None if lay is None else tuple(lay.shape)} cos_bf16_fp32={cos:.4f} "
              f"{ips:.0f} img/s build={build_s:.1f}s gflops={spec.gflops(r):.1f}", flush=True)
        del enc
        torch.cuda.empty_cache()
    except Exception as ex:  # noqa: BLE001 - one family failing must not hide the others
        import traceback

        print(f"{name:20s} FAILED {type(ex).__name__}: {ex}", flush=True)
        traceback.print_exc()
