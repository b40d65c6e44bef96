"""Writing outputs: files that honour the umask, and a full or read-only disk reported in one line.

Two libraries we write through ignore the umask: safetensors' ``save_file`` writes a private temporary file and
renames it (mode 0600), and ``tempfile.mkdtemp`` makes 0700 folders. A model served by another user (a serving
container, a shared group folder) could then not read it, so every weight file and temporary folder we create gets
the mode a plain ``open`` / ``mkdir`` would have given it (0644 / 0755 under umask 022).

Writing fails the same few ways on real disks: full (``ENOSPC``), over quota (``EDQUOT``), read-only (``EROFS``) or
not writable for this user (``EACCES``, ``EPERM``). :func:`writing` turns those into one :class:`StorageError` line
saying what was being written, where, how many bytes it needed and how many are free there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from internvl_tune.errors import StorageError

REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_OS_ERROR = re.compile(r"os error (\d+)")


def umask() -> int:
    """The process's umask: from /proc (Linux), else by setting it and setting it back at once (which another
    thread creating a file at that instant could notice)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give ``path`` the mode ``open`` (files: 0666) or ``mkdir`` (folders: 0777) would have, less the umask.

    Best effort: file systems without Unix modes (some network and FUSE mounts) refuse ``chmod``, and the file is
    then as readable as that file system makes it anyway.
    """
    base = 0o777 if Path(path).is_dir() else 0o666
    try:
        os.chmod(path, base & ~umask())
    except PermissionError:
        pass


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``parent``, with the mode of a plain ``mkdir`` (the folder is renamed into place)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    honour_umask(tmp)
    return tmp


def os_error_of(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc``: itself, or the one safetensors' writer names in its message."""
    if isinstance(exc, OSError):
        return exc
    match = _OS_ERROR.search(str(exc)) if type(exc).__name__ == "SafetensorError" else None
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None, fsync: bool = False):
    """``safetensors.torch.save_file`` with a plain file's mode, its I/O errors as ``OSError``, optionally fsynced."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as exc:
        os_error = os_error_of(exc)
        if os_error is None:
            raise
        os_error.filename = str(path)
        raise os_error from exc
    honour_umask(path)
    if fsync:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system of ``path`` (its nearest existing parent), or None when unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human(n: int | None) -> str:
    """``n`` bytes in GiB / MiB / KiB, or "unknown"."""
    if n is None:
        return "unknown"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def storage_error(exc: BaseException, what: str, where: str | Path, needed: int | None = None,
                  fix: str | None = None) -> StorageError | None:
    """The one-line :class:`StorageError` for ``exc``, or None when it is not a storage failure."""
    os_error = os_error_of(exc)
    if os_error is None or os_error.errno not in REASONS:
        return None
    where = Path(where or os_error.filename or ".")
    need = f"needs {human(needed)}, " if needed else ""
    if fix is None:
        fix = ("free space there or write to another disk" if os_error.errno in (errno.ENOSPC, errno.EDQUOT)
               else "make it writable for this user or write somewhere else")
    return StorageError(f"cannot write {what} to {where}: {REASONS[os_error.errno]} ({need}{human(free_bytes(where))} "
                        f"free there) — {fix}")


@contextlib.contextmanager
def writing(what: str, where: str | Path, needed: int | None = None, fix: str | None = None):
    """Turn a storage failure inside the block into one :class:`StorageError` line (see the module docstring)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        error = storage_error(exc, what, where, needed, fix)
        if error is None:
            raise
        raise error from exc
