"""Cell result directories: what a cell writes, and the store every runner writes it through.

A cell writes its results to `<sweep storage>/cells/<cell_id>/` before it returns, so a result
survives a driver (or a node) that dies before logging it, and `--resume` never recomputes it.
Results go through pyarrow filesystems (`ResultStore`): the driver reads what a trial wrote on any
node. This module sits below every cell runner (cells, cells.bags, cells.dense, cells.seg3d,
cells.registration) and the sweep driver; it imports nothing of theirs.
"""

from __future__ import annotations

import json
import uuid
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from orchestrator.store import storage

RESULT_FILE = "metrics.json"  # written last: a result directory without it is not a result
PLACEMENT_FILE = "placement.json"  # where the cell ran (node, resources), when run by Ray
ERROR_FILE = "error.json"
RUNNING_FILE = "running.json"  # .<cell_id>.running.json: where an attempt runs now (or ran, if it died)
IDENTITY_FILE = "identity.json"  # the cell's identity digests (orchestrator.grid.identity), beside its metrics
SUBSET_FILE = "train_subset.json"  # the cell's train size and what its subset holds (run params)


class ResultStore:
    """Cell result directories under one root (a path or a URI), complete or absent."""

    def __init__(self, root: str, identity: dict[str, str] | None = None):
        """`identity` (a cell spec's): written beside every result as identity.json, so each runner
        stores it without knowing of it."""
        self.root = root
        self.identity = identity
        self.fs, self.base = storage.split_uri(root)
        self.fs.create_dir(self.base, recursive=True)

    def path(self, cell_id: str) -> str:
        return f"{self.base}/{cell_id}"

    def read(self, cell_id: str) -> dict[str, Any] | None:
        return storage.read_json(self.fs, f"{self.path(cell_id)}/{RESULT_FILE}")

    def read_file(self, cell_id: str, name: str) -> Any | None:
        """A JSON file of the cell's result directory, or None."""
        return storage.read_json(self.fs, f"{self.path(cell_id)}/{name}")

    def read_identity(self, cell_id: str) -> dict[str, str]:
        return storage.read_json(self.fs, f"{self.path(cell_id)}/{IDENTITY_FILE}") or {}

    def attempted(self, cell_id: str) -> bool:
        """A result, a running mark or an error of this cell exists (an earlier sweep got to it)."""
        return any(storage.exists(self.fs, p) for p in (f"{self.path(cell_id)}/{RESULT_FILE}",
                                                        f"{self.base}/.{cell_id}.{RUNNING_FILE}",
                                                        f"{self.base}/.{cell_id}.{ERROR_FILE}"))

    def placement(self, cell_id: str) -> dict[str, Any]:
        return storage.read_json(self.fs, f"{self.path(cell_id)}/{PLACEMENT_FILE}") or {}

    def read_error(self, cell_id: str) -> str | None:
        err = storage.read_json(self.fs, f"{self.base}/.{cell_id}.{ERROR_FILE}")
        return err["message"] if err else None

    def write_error(self, cell_id: str, message: str, tb: str) -> None:
        data = json.dumps({"message": message, "traceback": tb}).encode()
        storage.write_bytes(self.fs, f"{self.base}/.{cell_id}.{ERROR_FILE}", data)

    def mark_running(self, cell_id: str, placement: dict[str, Any]) -> None:
        storage.write_bytes(self.fs, f"{self.base}/.{cell_id}.{RUNNING_FILE}",
                            json.dumps(placement, sort_keys=True).encode())

    def running(self) -> dict[str, dict[str, Any]]:
        """Attempts under way, by cell id, with their node (a node that died leaves its marks)."""
        out = {}
        for name in storage.files_under(self.fs, self.base):
            if name.startswith(".") and name.endswith(f".{RUNNING_FILE}"):
                mark = storage.read_json(self.fs, f"{self.base}/{name}")
                if mark is not None:
                    out[name[1:-len(RUNNING_FILE) - 1]] = mark
        return out

    def clear_marks(self, cell_id: str, *kinds: str) -> None:
        for kind in kinds:
            path = f"{self.base}/.{cell_id}.{kind}"
            if storage.exists(self.fs, path):
                self.fs.delete_file(path)

    def delete(self, cell_id: str) -> None:
        storage.delete_dir(self.fs, self.path(cell_id))
        self.clear_marks(cell_id, ERROR_FILE, RUNNING_FILE)

    def write(self, cell_id: str, files: dict[str, bytes | Path]) -> None:
        """Stage every file, metrics last, then publish; an earlier result (a retry after a node
        died between writing and reporting) is replaced. A value may be a local file's path (read
        when staged, one at a time: many prediction files never sit in memory together)."""
        stage = f"{self.base}/.stage-{cell_id}-{uuid.uuid4().hex[:8]}"
        self.fs.create_dir(stage, recursive=True)
        if self.identity and IDENTITY_FILE not in files:
            files = {**files, IDENTITY_FILE: json.dumps(self.identity, indent=1, sort_keys=True).encode()}
        for name in sorted(files, key=lambda n: n == RESULT_FILE):
            data = files[name]
            storage.write_bytes(self.fs, f"{stage}/{name}", data.read_bytes() if isinstance(data, Path) else data)
        final = self.path(cell_id)
        if not storage.publish_dir(self.fs, stage, final, last=RESULT_FILE):
            self.fs.move(final, f"{stage}-old")  # a rename: never a half-deleted result in place
            storage.publish_dir(self.fs, stage, final, last=RESULT_FILE)
            self.fs.delete_dir(f"{stage}-old")
        self.clear_marks(cell_id, ERROR_FILE, RUNNING_FILE)

    def local_dir(self, cell_id: str) -> AbstractContextManager[str]:
        """The result directory as a local path (downloaded from an object store), for MLflow."""
        return storage.local_copy(self.fs, self.path(cell_id))
