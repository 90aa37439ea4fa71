"""dsmoe.fileio: what a write publishes and when (fsync before the rename, the folder's fsync after
it), what a failure leaves (the old file, no temporary), and that no descriptor leaks. The fsyncs
are observed by wrapping os.fsync and naming each descriptor through /proc/self/fd."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dsmoe import fileio

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors through /proc/self/fd")


def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def events(monkeypatch):
    """Records ("fsync", path) and ("replace", src, dst) in the order they happen."""
    log = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def test_write_bytes_atomic_syncs_the_file_then_renames_then_syncs_the_folder(tmp_path, events):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    before = open_fds()
    fileio.write_bytes_atomic(target, b"new bytes")
    assert target.read_bytes() == b"new bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary left
    assert open_fds() == before
    (kind0, tmp_synced), (kind1, src, dst), (kind2, folder) = events
    assert (kind0, kind1, kind2) == ("fsync", "replace", "fsync")
    # the temporary beside the target, named after it, is synced with its bytes and renamed
    assert tmp_synced == src and Path(src).parent == tmp_path and Path(src).name.startswith("state.json.tmp-")
    assert dst == str(target) and folder == str(tmp_path)
    # a str path works as well, and two writes use different temporaries
    events.clear()
    fileio.write_bytes_atomic(str(target), b"again")
    assert target.read_bytes() == b"again" and events[1][1] != src


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_write_bytes_atomic_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch, fail_at):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"last good")

    monkeypatch.setattr(os, fail_at, disk_full)
    before = open_fds()
    with pytest.raises(OSError, match="No space left"):
        fileio.write_bytes_atomic(target, b"x" * 1000)
    assert target.read_bytes() == b"last good"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]
    assert open_fds() == before


def test_write_bytes_atomic_interrupted_removes_the_temporary(tmp_path, monkeypatch):
    # a signal arriving as KeyboardInterrupt (a BaseException, not an Exception) cleans up too
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fileio.write_bytes_atomic(tmp_path / "a", b"data")
    assert list(tmp_path.iterdir()) == []


def test_fsync_tree_syncs_every_file_and_folder_deepest_first(tmp_path, events):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    files = [tmp_path / "a.bin", tmp_path / "sub" / "b.bin", tmp_path / "sub" / "deeper" / "c.bin"]
    for f in files:
        f.write_bytes(b"1")
    before = open_fds()
    fileio.fsync_tree(tmp_path)
    assert open_fds() == before
    synced = [e[1] for e in events]
    assert all(e[0] == "fsync" for e in events)
    folders = [tmp_path / "sub" / "deeper", tmp_path / "sub", tmp_path]
    assert sorted(synced) == sorted(str(p) for p in files + folders) and len(synced) == 6
    # what a folder holds is synced before the folder, and the root comes last
    assert synced[-1] == str(tmp_path)
    for f in files:
        assert synced.index(str(f)) < synced.index(str(f.parent))
    assert synced.index(str(folders[0])) < synced.index(str(folders[1]))


def test_fsync_tree_of_an_empty_folder_syncs_the_folder(tmp_path, events):
    fileio.fsync_tree(tmp_path)
    assert events == [("fsync", str(tmp_path))]


def test_fsync_dir_where_folders_cannot_be_synced(tmp_path, monkeypatch):
    before = open_fds()
    fileio.fsync_dir(tmp_path / "missing")  # cannot be opened: nothing to do, no error
    calls = []

    def refused(fd):
        calls.append(fd)
        raise OSError(22, "Invalid argument")  # what some filesystems answer for a folder

    monkeypatch.setattr(os, "fsync", refused)
    fileio.fsync_dir(tmp_path)
    assert len(calls) == 1
    assert open_fds() == before  # the descriptor is closed either way


def test_write_bytes_atomic_failure_before_the_temporary_exists_raises_that_failure(tmp_path, monkeypatch):
    # the cleanup must not replace the real error (a full disk) with "no such temporary"
    monkeypatch.setattr(fileio, "open", disk_full, raising=False)
    with pytest.raises(OSError) as info:
        fileio.write_bytes_atomic(tmp_path / "a", b"data")
    assert info.value.errno == 28 and list(tmp_path.iterdir()) == []
