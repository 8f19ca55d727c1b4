"""Storage of everything an experiment writes, through pyarrow.fs: a local path, a shared path or a URI.

    EXP_DIR/widthsearch/<name>     experiment.json, rows/, base.pt, searcher artifacts (aofp/, metapruning/), ...

`Storage(exp_dir)` reads and writes files under EXP_DIR/widthsearch the same way for `runs/exp`,
`/mnt/shared/exp`, `file:///...` and `s3://bucket/exp`; `write_atomic` is the one atomic writer
(temporary name in the same folder, then a move) that every writer in the project uses.
"""

from __future__ import annotations

import io
import os
import re
import uuid
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

if TYPE_CHECKING:
    import torch


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a URI such as s3://bucket/x, or for a local path (made absolute)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def write_atomic(path: str, data: bytes, fs: pafs.FileSystem | None = None) -> None:
    """Write `data` to `path` (a local path or URI; with `fs`, a path on it) so readers see all or nothing.

    The parent folder is created; the bytes go to a hidden temporary name beside `path`, then move onto it.
    """
    if fs is None:
        fs, path = filesystem(path)
    folder, name = path.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    except BaseException:
        if fs.get_file_info(tmp).type == pafs.FileType.File:
            fs.delete_file(tmp)
        raise


def torch_bytes(obj: object) -> bytes:
    """`torch.save` of `obj` into bytes (for write_atomic / Storage.write_bytes)."""
    import torch  # here, not at the top: reading an experiment's table needs no torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def check_writable(folder: str) -> None:
    """StorageError (one line, the reason) unless a file can be written into `folder` (a local path or a URI;
    created when missing) through pyarrow.fs and deleted again: checked before any data is read or model trained."""
    from .errors import StorageError

    probe = None
    try:
        fs, path = filesystem(folder)
        fs.create_dir(path, recursive=True)
        probe = f"{path.rstrip('/')}/.widthsearch-probe-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as out:
            out.write(b"probe")
        fs.delete_file(probe)
    except (OSError, ValueError) as exc:  # pyarrow's errors are OSError (I/O) or ValueError (ArrowInvalid)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot write to the storage {folder}: {reason}") from exc


def upload_folder(local: str | os.PathLike, dest: str) -> None:
    """Copy the local folder `local` (its files and folders) to `dest`, a local path or a URI."""
    fs, path = filesystem(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


class Storage:
    """Files under EXP_DIR/widthsearch, read and written through pyarrow.fs (paths use '/')."""

    def __init__(self, exp_dir: str):
        self.exp_dir = exp_dir
        self.fs, root = filesystem(exp_dir)
        self.root = f"{root.rstrip('/')}/widthsearch"

    def path(self, name: str) -> str:
        """The full path on this storage's filesystem of widthsearch/<name>."""
        return f"{self.root}/{name}"

    def uri(self, name: str) -> str:
        """widthsearch/<name> as the user wrote the experiment's location (a URI stays a URI)."""
        return f"{self.exp_dir.rstrip('/')}/widthsearch/{name}"

    def has(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def read_bytes(self, name: str) -> bytes | None:
        """The bytes of widthsearch/<name>, or None when there is no such file."""
        if not self.has(name):
            return None
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write widthsearch/<name> atomically, creating folders."""
        write_atomic(self.path(name), data, self.fs)

    def load_torch(self, name: str, map_location: str | torch.device = "cpu") -> object | None:
        """`torch.load(weights_only=True)` of widthsearch/<name>, or None when there is no such file."""
        import torch

        data = self.read_bytes(name)
        return None if data is None else torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)

    def save_torch(self, name: str, obj: object) -> None:
        """`torch.save` `obj` to widthsearch/<name>, atomically."""
        self.write_bytes(name, torch_bytes(obj))

    def names(self, folder: str) -> list[str]:
        """File names (not hidden) directly in widthsearch/<folder>, sorted; [] when it does not exist."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(folder), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith("."))
