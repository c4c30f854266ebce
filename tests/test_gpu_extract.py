"""benchmarks/gpu_extract.py: its --quick checks (pinned/stream, fp16 maps, bf16 weights, compiled
and padded, compile fallback) pass on CPU, and it imports neither Ray nor MLflow, so it runs on a
GPU machine that has neither."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_paths_match_eager() -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_extract import QUICK_LIMITS, quick_checks

    errors = quick_checks()
    assert set(errors) == set(QUICK_LIMITS)
    bad = {k: v for k, v in errors.items() if v > QUICK_LIMITS[k]}
    assert not bad, bad
    # the bf16 path really ran in bf16 (a zero error would mean the weights stayed fp32)
    assert errors["bf16_weights"] > 0


def test_benchmark_imports_no_ray_or_mlflow() -> None:
    code = ("import sys; import benchmarks.gpu_extract as g; assert g.EncoderUDF and g.DenseEncoderUDF; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout
