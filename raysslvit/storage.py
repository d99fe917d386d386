"""`--storage URI`: where a run's results and checkpoints also live, for runs whose machines share
no disk. A folder every node sees, or a pyarrow URI such as
`s3://bucket/prefix?endpoint_override=127.0.0.1:8333&scheme=http` (credentials from the
environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).

The driver stays its run folder's one writer: each file it writes into a stage's folder (every
checkpoint, then the result) is copied to the same place under the storage, and a stage whose
folder lacks files that the storage holds gets them back before it looks for a result or a
checkpoint, so a driver killed on one machine resumes on another. Ray Train and Tune keep their
own state under the same storage.
"""
from __future__ import annotations

import os
import posixpath

from raysslvit.artifacts import atomic_path
from raysslvit.errors import UserError


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended to its path, before any `?query` (its endpoint and scheme)."""
    path, mark, query = uri.partition("?")
    return posixpath.join(path, *parts) + mark + query


def open_storage(uri: str) -> "Storage | None":
    """The storage `--storage` names, reached once here; None without one."""
    return Storage(uri) if uri else None


class Storage:
    """A folder of a pyarrow file system: `child` for a subfolder, `push` / `pull` to copy files."""

    def __init__(self, uri: str, _fs=None, _root: str = ""):
        import pyarrow.fs

        self.uri = uri if "://" in uri else os.path.abspath(uri)  # a folder: absolute, for processes elsewhere
        if _fs is not None:
            self.fs, self.root = _fs, _root
            return
        try:
            self.fs, self.root = pyarrow.fs.FileSystem.from_uri(self.uri)
            found = self.fs.get_file_info(self.root).type  # reached once here, before any stage runs
        except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError
            raise UserError(f"cannot reach --storage {uri} ({str(e).splitlines()[0]})") from None
        if found == pyarrow.fs.FileType.File:
            raise UserError(f"--storage {uri} is a file, not a folder")

    @property
    def local(self) -> bool:
        import pyarrow.fs

        return isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def child(self, *parts: str) -> "Storage":
        return Storage(join(self.uri, *parts), self.fs, posixpath.join(self.root, *parts))

    def files(self, rel: str = "") -> dict[str, int]:
        """{path relative to this folder: size} of every file under `rel`. Listed a folder at a time:
        an object store may still list a folder that a moment ago was removed (an old checkpoint)."""
        import pyarrow.fs

        found, folders = {}, [posixpath.join(self.root, rel) if rel else self.root]
        while folders:
            try:
                listed = self.fs.get_file_info(pyarrow.fs.FileSelector(folders.pop(), allow_not_found=True))
            except OSError as e:
                raise UserError(f"cannot read --storage {self.uri} ({str(e).splitlines()[0]})") from None
            for info in listed:
                if info.type == pyarrow.fs.FileType.Directory:
                    folders.append(info.path)
                elif info.type == pyarrow.fs.FileType.File:  # (relpath would ask for the cwd)
                    found[info.path[len(self.root):].lstrip("/")] = info.size
        return found

    def push(self, local_root: str, rel: str) -> None:
        """The file or folder `local_root/rel` to the same place here (a folder's files one by one)."""
        path = os.path.join(local_root, rel)
        if self.local and os.path.realpath(path) == os.path.realpath(posixpath.join(self.root, rel)):
            return  # the storage is this very folder
        names = ([rel] if os.path.isfile(path) else
                 [os.path.relpath(os.path.join(d, n), local_root) for d, _, files in os.walk(path) for n in files])
        for name in sorted(names):
            if name.startswith(".") or "/." in name or ".tmp" in name:  # the lock, temporary files
                continue
            try:
                self.fs.create_dir(posixpath.dirname(posixpath.join(self.root, name)), recursive=True)
                with open(os.path.join(local_root, name), "rb") as src, \
                        self.fs.open_output_stream(posixpath.join(self.root, name)) as dst:
                    dst.write(src.read())
            except OSError as e:
                raise UserError(f"cannot write to --storage {self.uri} ({str(e).splitlines()[0]})") from None

    def remove(self, rel: str) -> None:
        try:
            self.fs.delete_dir(posixpath.join(self.root, rel))
        except (FileNotFoundError, OSError):
            pass  # gone already, or never pushed

    def pull(self, local_root: str, rel: str = "") -> list[str]:
        """The files under `rel` here that `local_root` lacks, copied there (each atomically);
        returns their names."""
        fetched = []
        for name in sorted(self.files(rel)):
            target = os.path.join(local_root, name)
            if os.path.exists(target):
                continue
            try:
                with self.fs.open_input_stream(posixpath.join(self.root, name)) as src, atomic_path(target) as tmp, \
                        open(tmp, "wb") as dst:
                    dst.write(src.read())
            except FileNotFoundError:  # listed, then removed (see `files`)
                continue
            fetched.append(name)
        return fetched

    def ray_train(self) -> dict:
        """RunConfig's storage keywords for Ray Train (and Tune) under this folder."""
        return {"storage_path": posixpath.join(self.root, ".ray_train"), "storage_filesystem": self.fs}
