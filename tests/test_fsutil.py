"""Atomic writes: temps carry their writer's pid, abandoned ones are swept, folders swap whole."""
import os
import re
import subprocess
import sys
import time

import pytest

from shared import fsutil
from tests.conftest import ROOT

HOUR = 3600


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_writer_killed_mid_write_leaves_a_pid_temp_that_the_next_write_removes(tmp_path):
    target = tmp_path / "ck.bin"
    # The child dies between writing its temp and renaming it: what a kill -9 mid-save leaves.
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); from shared import fsutil\n"
            "fsutil.os.replace = lambda *a: os._exit(9)\n"
            "fsutil.atomic_write_bytes(sys.argv[2], b'half')\n")
    child = subprocess.run([sys.executable, "-c", code, str(ROOT), str(target)], timeout=60)
    assert child.returncode == 9 and not target.exists()
    (left,) = _temps(tmp_path)
    assert re.fullmatch(r"\.ck\.bin\.\d+\.[a-z0-9_]+\.tmp", left), left
    assert int(left.split(".")[3]) != os.getpid()
    _age(tmp_path / left, 2 * fsutil.DEAD_PID_GRACE_S)
    fsutil.atomic_write_bytes(target, b"whole")
    assert target.read_bytes() == b"whole" and _temps(tmp_path) == []


def test_only_abandoned_temps_of_the_same_target_are_swept(tmp_path):
    target, dead, alive = tmp_path / "f", _dead_pid(), os.getppid()
    names = {
        f".f.{dead}.abcd1234.tmp": (2 * fsutil.DEAD_PID_GRACE_S, True),  # writer gone, quiet for long: swept
        f".f.{dead}.abcd1235.tmp": (1, False),  # writer gone but just written: maybe another host's, kept
        f".f.{alive}.abcd1236.tmp": (10 * HOUR, False),  # writer still running (a slow fsync), kept
        f".f.{os.getpid()}.abcd1237.tmp": (10 * HOUR, False),  # ours: another thread may be writing it
        ".f.legacy12.tmp": (2 * HOUR, True),  # before pids were in the name: swept after an hour
        ".f.legacy34.tmp": (60, False),
        f".f.bin.{dead}.abcd1238.tmp": (10 * HOUR, False),  # a temp of f.bin, not of f
        ".f.8.old": (10 * HOUR, False),  # a folder set aside by atomic_replace_dir is never swept
    }
    for name, (age, _) in names.items():
        (tmp_path / name).write_bytes(b"x")
        _age(tmp_path / name, age)
    stale_dir = tmp_path / f".f.{dead}.dir12345.tmp"  # a dataset folder being built when the run died
    (stale_dir / "sub").mkdir(parents=True)
    _age(stale_dir, 2 * fsutil.DEAD_PID_GRACE_S)
    fsutil.atomic_write_text(target, "new")
    expect = sorted(n for n, (_, swept) in names.items() if not swept)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "f") == expect


def test_temp_files_and_folders_get_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        fsutil.atomic_write_bytes(tmp_path / "a", b"1")
        folder = fsutil.make_temp_dir(tmp_path / "ds")
    finally:
        os.umask(umask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755
    assert folder.parent == tmp_path and folder.name.startswith(f".ds.{os.getpid()}.")


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_atomic_replace_dir_swaps_whole_folders(tmp_path):
    dest = tmp_path / "ds"
    first = fsutil.make_temp_dir(dest)
    (first / "a.bin").write_bytes(b"old")
    fsutil.atomic_replace_dir(first, dest)
    second = fsutil.make_temp_dir(dest)
    (second / "b.bin").write_bytes(b"new")
    fsutil.atomic_replace_dir(second, dest)
    assert _tree(dest) == {"b.bin": b"new"}  # no file of the old build survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # nor the set-aside copy


def test_a_failed_dir_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    dest = tmp_path / "ds"
    dest.mkdir()
    (dest / "a.bin").write_bytes(b"old")
    new = fsutil.make_temp_dir(dest)
    (new / "b.bin").write_bytes(b"new")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # dest is already set aside; moving the new folder in fails
            raise OSError("disk gone")
        real_rename(src, dst)
    monkeypatch.setattr(fsutil.os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        fsutil.atomic_replace_dir(new, dest)
    assert _tree(dest) == {"a.bin": b"old"} and _tree(new) == {"b.bin": b"new"}
