"""captioner.files, the one home of file safety: bounded reads of regular files, atomic writes, exclusive locks."""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from captioner import files
from captioner.errors import ConfigError
from captioner.files import atomic_file, lock, read_bounded, read_json, release


def test_read_bounded_reads_what_a_file_holds_whatever_its_size_says(tmp_path):
    """A file is read in a piece of its size, then in chunks: /proc's files say 0 bytes and hold more."""
    status = read_bounded("/proc/self/status", 1 << 20, "status", "file")
    assert b"VmSize:" in status and status.endswith(b"\n")
    with pytest.raises(ConfigError, match="^status: file larger than 100 bytes$"):
        read_bounded("/proc/self/status", 100, "status", "file")
    (tmp_path / "small").write_bytes(b"12345")
    assert read_bounded(tmp_path / "small", 5, "small", "file") == b"12345"
    with pytest.raises(ConfigError, match="^small: file larger than 4 bytes$"):
        read_bounded(tmp_path / "small", 4, "small", "file")


def test_read_bounded_without_following_refuses_a_link_and_reads_beside_a_folder(tmp_path):
    (tmp_path / "real").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert read_bounded(tmp_path / "link", 10, "link", "file") == b"data"
    with pytest.raises(ConfigError, match=r"^link: cannot read the file \(Too many levels of symbolic links\)$"):
        read_bounded(tmp_path / "link", 10, "link", "file", follow=False)
    folder = files.open_folder(tmp_path)
    try:
        assert read_bounded("real", 10, "real", "file", follow=False, dir_fd=folder) == b"data"
    finally:
        os.close(folder)
    with pytest.raises(OSError):
        files.open_folder(tmp_path / "link")


@pytest.mark.parametrize("path, message", [("/dev/zero", "file is not a regular file (a device)"),
                                           ("/", "file is not a regular file (a folder)"),
                                           ("/nonexistent/file", "file not found")])
def test_only_regular_files_are_opened(path, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(path)}: {re.escape(message)}$"):
        files.open_regular(path, path, "file")


def test_read_json_is_one_line_per_problem(tmp_path):
    (tmp_path / "bom.json").write_bytes(files.UTF8_BOM + b'{"a": 1}')
    assert read_json(tmp_path / "bom.json", 100, "file") == {"a": 1}
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(ConfigError, match=r"^.*bad.json: invalid file \(malformed JSON at line 1, column 7: "):
        read_json(tmp_path / "bad.json", 100, "file")
    (tmp_path / "bad.toml").write_text("a = ")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid file \(unusable TOML: "):
        read_json(tmp_path / "bad.toml", 100, "file", toml=True)


def test_an_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_file(target) as temporary:
        assert re.fullmatch(rf"\.out\.txt\.tmp-{os.getpid()}-[0-9a-f]{{8}}", temporary.name)
        assert temporary.parent == tmp_path
        temporary.write_text("first")
    with pytest.raises(RuntimeError), atomic_file(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_an_atomic_write_removes_only_the_temporaries_of_dead_writers(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    try:
        writing = tmp_path / f".out.txt.tmp-{alive.pid}-0a1b2c3d"
        killed = [tmp_path / f".out.txt.tmp-{dead}-0a1b2c3d", tmp_path / f".out.txt.tmp-{dead}"]
        for file in (writing, *killed):
            file.write_text("partial")
        with atomic_file(tmp_path / "out.txt") as temporary:
            temporary.write_text("done")
        assert writing.exists() and not any(file.exists() for file in killed)
    finally:
        alive.kill()
        alive.wait()


def test_a_lock_is_exclusive_until_released(tmp_path):
    held = lock(tmp_path / ".lock", blocking=False)
    with pytest.raises(BlockingIOError):
        lock(tmp_path / ".lock", blocking=False)
    taken = threading.Event()

    def wait_for_it() -> None:
        release(lock(tmp_path / ".lock"))  # blocks until the holder releases
        taken.set()

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    assert not taken.wait(0.3)
    release(held)
    waiter.join(10)
    assert taken.is_set()


def _start_and_sleep(started) -> None:
    started.set()
    time.sleep(30)


def test_a_forked_child_does_not_keep_a_lock_alive(tmp_path):
    """A DataLoader worker forked while a lock is held must not hold it past the process that took it."""
    held = lock(tmp_path / ".lock", blocking=False)
    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    child = fork.Process(target=_start_and_sleep, args=(started,))
    child.start()
    try:
        assert started.wait(30)  # past the fork's handlers
        release(held)
        release(lock(tmp_path / ".lock", blocking=False))  # free, though the child still runs
    finally:
        child.kill()
        child.join()
