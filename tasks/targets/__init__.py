"""Target kinds: one module per kind of dense target, each registering its handler here.

- `mask2d` (tasks/targets/mask2d.py): 2D label maps (endoscopy, echocardiography frames);
- `mask3d` (mask3d.py): 3D label volumes (MSD, ACDC, PET/CT), predictions as NIfTI on the source grid;
- `instances` (instances.py): EM neuron segmentations from affinities (VOI, ARAND), HDF5;
- `pairs` (pairs.py): registration pairs (no handler: the registration runner scores warped labels).

A new kind: add it to `tasks.dense.TARGET_KINDS`, write its module with a class decorated by
`@register_target_handler("<kind>")`, and import the module below.
"""

from __future__ import annotations

from tasks.targets import instances, mask2d, mask3d, pairs  # noqa: F401 - importing registers the handlers
from tasks.targets.base import TARGET_HANDLERS, TargetHandler, register_target_handler

__all__ = ["TARGET_HANDLERS", "TargetHandler", "register_target_handler"]
