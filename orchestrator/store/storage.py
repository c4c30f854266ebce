"""Shared storage through pyarrow filesystems: a local disk, NFS, s3://, gs:// alike.

Everything every node of a cluster reads or writes (feature cache, cell results) goes through
here, so no code path assumes a POSIX path. The one primitive that differs between filesystems is
publishing a finished directory:

- local disks and NFS have an atomic directory rename that refuses to replace a non-empty
  directory: the first writer wins, a second one learns it lost and discards its copy;
- object stores (S3, GCS) have no directory rename at all (pyarrow refuses it): files are copied
  one by one with a marker file last, so a reader that trusts only the marker never sees a half
  entry. Two simultaneous writers of the same entry are not excluded there; the marker names the
  files of one writer, so what is read is never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs


def split_uri(root: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI (s3://, gs://, file://) or a local path."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    if is_local(fs) and "/" in path:  # object stores have no directories; local disks need them
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    # compression=None: bytes are written as given (pyarrow would gzip a *.nii.gz a second time).
    with fs.open_output_stream(path, compression=None) as f:
        f.write(data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def read_json(fs: pafs.FileSystem, path: str) -> Any | None:
    """The parsed file, or None when it does not exist."""
    try:
        return json.loads(read_bytes(fs, path).decode())
    except FileNotFoundError:
        return None


def delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if exists(fs, path):
        fs.delete_dir(path)


def files_under(fs: pafs.FileSystem, path: str) -> list[str]:
    """Paths of every file under `path`, relative to it, sorted."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)


def publish_dir(fs: pafs.FileSystem, staged: str, final: str, last: str | None = None) -> bool:
    """Move a complete `staged` directory to `final`. False, `staged` left in place, when `final`
    already holds a directory (local disks and NFS only; see the module doc).

    `last` names the file that marks the directory complete; on object stores it is copied last.
    """
    if is_local(fs):
        try:
            os.rename(staged, final)  # atomic; refuses a non-empty target (ENOTEMPTY / EEXIST)
            return True
        except OSError:
            if not exists(fs, final):
                raise
            return False
    names = files_under(fs, staged)
    for name in sorted(names, key=lambda n: n == last):  # the marker after everything it names
        fs.copy_file(f"{staged}/{name}", f"{final}/{name}")
    fs.delete_dir(staged)
    return True


@contextlib.contextmanager
def local_copy(fs: pafs.FileSystem, path: str) -> Iterator[str]:
    """A local directory with the files under `path` (itself on a local filesystem)."""
    if is_local(fs):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="medscale-") as tmp:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
