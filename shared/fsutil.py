"""Atomic file writes: a reader never sees half a file, a crash never loses the old one.

Temp files are named `.NAME.<pid>.XXXXXXXX.tmp` next to NAME, so a later write to
NAME can tell an abandoned temp (its writer is gone) from one still being written.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

# A dead pid is only proof on this host; on a shared filesystem another host's writer
# may own it, so its temp must also have sat untouched this long before we remove it.
DEAD_PID_GRACE_S = 300
LEGACY_TEMP_AGE_S = 3600  # temps from before pids were in the name: removed once an hour old
_PID_TEMP = re.compile(r"(\d+)\.[a-z0-9_]+")
_LEGACY_TEMP = re.compile(r"[a-z0-9_]+")


def temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def write_temp_for(path: str | os.PathLike, data: bytes) -> Path:
    """Write data, fsynced, to a fresh temp sibling of path; os.replace(temp, path) commits it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    tmp = write_temp_for(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def make_temp_dir(dest: str | os.PathLike) -> Path:
    """An empty folder next to dest (same filesystem, so atomic_replace_dir can rename it over dest)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    tmp = tempfile.mkdtemp(prefix=temp_prefix(dest), suffix=".tmp", dir=dest.parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the swapped-in folder gets normal permissions
    return Path(tmp)


def atomic_replace_dir(tmp_dir: str | os.PathLike, dest_dir: str | os.PathLike) -> None:
    """Put the complete folder tmp_dir at dest_dir; the old dest_dir is kept aside until then, removed after.

    Two renames, not one (POSIX cannot rename a folder over a non-empty one): a crash between
    them leaves dest_dir absent and the old folder intact at `.NAME.<pid>.old` (never swept as stale).
    """
    tmp_dir, dest_dir = Path(tmp_dir), Path(dest_dir)
    if not dest_dir.exists():
        os.rename(tmp_dir, dest_dir)
        return
    old = dest_dir.with_name(f"{temp_prefix(dest_dir)}old")
    os.rename(dest_dir, old)
    try:
        os.rename(tmp_dir, dest_dir)
    except BaseException:
        os.rename(old, dest_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove abandoned temps of path (files or folders) left by writers that were killed; return them."""
    path = Path(path)
    prefix, removed = f".{path.name}.", []
    try:
        with os.scandir(path.parent) as it:
            entries = [e for e in it if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except OSError:
        return removed
    for entry in entries:
        if _is_stale(entry.name[len(prefix):-len(".tmp")], Path(entry.path)):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass  # another writer cleaned it first, or we may not: either way not our failure
    return removed


def _is_stale(middle: str, tmp: Path) -> bool:
    try:
        age = time.time() - tmp.lstat().st_mtime
    except OSError:
        return False
    m = _PID_TEMP.fullmatch(middle)
    if m:
        return not _pid_alive(int(m.group(1))) and age > DEAD_PID_GRACE_S
    return bool(_LEGACY_TEMP.fullmatch(middle)) and age > LEGACY_TEMP_AGE_S


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of ours may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else (EPERM)
    return True
