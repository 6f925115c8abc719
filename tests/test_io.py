"""lipfast._io.atomic_file: all or nothing, the permission bits a plain open
would give (or those of the replaced file), and a durable rename."""

import os
import stat

import pytest

from lipfast import _io


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Sets the process umask for one test and restores it afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask):
        os.umask(mask)

    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_new_file_gets_the_mode_of_a_plain_open(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.bin"
    with open(plain, "wb") as f:
        f.write(b"x")
    target = tmp_path / "atomic.bin"
    with _io.atomic_file(target) as f:
        f.write(b"data")
    assert target.read_bytes() == b"data"
    assert mode_of(target) == mode_of(plain) == 0o666 & ~mask


@pytest.mark.parametrize("old_mode", [0o600, 0o640, 0o664, 0o444])
def test_replaced_file_keeps_its_mode(tmp_path, umask, old_mode):
    umask(0o022)
    target = tmp_path / "ckpt.pth"
    target.write_text("old")
    os.chmod(target, old_mode)
    with _io.atomic_file(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"
    assert mode_of(target) == old_mode


def test_umask_read_matches_the_process_umask(umask):
    for mask in (0o022, 0o077, 0o007):
        umask(mask)
        assert _io._umask() == mask


def test_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_replace, real_fsync_dir = os.replace, _io._fsync_dir

    def replace(src, dst):
        events.append(("replace", os.fspath(dst)))
        real_replace(src, dst)

    def fsync_dir(folder):
        events.append(("fsync_dir", folder, os.path.exists(tmp_path / "out.txt")))
        real_fsync_dir(folder)

    monkeypatch.setattr(_io.os, "replace", replace)
    monkeypatch.setattr(_io, "_fsync_dir", fsync_dir)
    with _io.atomic_file(tmp_path / "out.txt", "w") as f:
        f.write("x")
    assert events == [("replace", str(tmp_path / "out.txt")),
                      ("fsync_dir", str(tmp_path), True)]


def test_fsync_dir_really_syncs_the_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd")
                      else fd)
        real(fd)

    monkeypatch.setattr(_io.os, "fsync", fsync)
    with _io.atomic_file(tmp_path / "a.bin") as f:
        f.write(b"1")
    if os.path.exists("/proc/self/fd"):
        assert str(tmp_path.resolve()) in synced
    assert len(synced) == 2  # the file, then its folder


def test_failure_keeps_the_old_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with _io.atomic_file(target, "w") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_folder_as_target_and_bad_mode_are_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        with _io.atomic_file(tmp_path) as f:
            f.write(b"x")
    with pytest.raises(ValueError, match="mode must be"):
        with _io.atomic_file(tmp_path / "x", "a"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_writers_give_group_readable_files(tmp_path, umask):
    # The real writers (checkpoints, metric states) go through atomic_file.
    import torch

    from lipfast._train_utils import atomic_save
    from lipfast.metrics import ParsingMetrics

    umask(0o022)
    atomic_save({"w": torch.zeros(2)}, tmp_path / "ckpt.pth")
    ParsingMetrics(num_classes=3).save(tmp_path / "metrics.pt")
    for name in ("ckpt.pth", "metrics.pt"):
        assert mode_of(tmp_path / name) == 0o644, name
