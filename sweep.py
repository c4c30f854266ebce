"""Run a medscale sweep: `python sweep.py --config configs/demo.yaml`.

The same as `medscale sweep CONFIG`; this file exists so that a cluster runs it with
`ray submit clusters/aws.yaml sweep.py -- --config configs/paper.yaml`.
"""

import sys
from pathlib import Path

# `ray submit` copies this file alone; the package is installed on every node, but running from a
# checkout without installing should work too.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from orchestrator.cli import sweep_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(sweep_main())
