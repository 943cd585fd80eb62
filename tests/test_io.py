"""Atomic writes and the clean-up of what a killed write leaves: a temporary file is removed only when its writer
is gone, never while a live process (here or on another machine of a shared file system) may still rename it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import crystalign.io as io
from crystalign.io import atomic_path, remove_stale_parts


def test_temporary_files_name_their_writer(tmp_path):
    with atomic_path(tmp_path / "out.json") as tmp:
        owner = io._PART.match(tmp.name)
        assert owner and owner["name"] == "out.json" and int(owner["pid"]) == os.getpid() and owner["host"] == io._HOST
        tmp.write_text("{}")
    assert (tmp_path / "out.json").read_text() == "{}" and not list(tmp_path.glob(".*.part"))


def test_only_abandoned_temporary_files_are_removed(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        files = {
            "dead": f".last.ckpt.{io._HOST}-{dead_pid}.a1.part",  # killed mid-write on this machine
            "alive": f".last.ckpt.{io._HOST}-{alive.pid}.b2.part",  # another run still writing (a slow fsync)
            "mine": f".best.ckpt.{io._HOST}-{os.getpid()}.c3.part",
            "foreign_recent": ".last.ckpt.othernode-12.d4.part",  # another machine, written a minute ago
            "foreign_old": ".last.ckpt.othernode-13.e5.part",  # another machine, untouched for two hours
            "legacy_old": ".history.json.f6.part",  # an older name, from before this process
            "output": "last.ckpt",  # a finished output is never a temporary file
        }
        for path in files.values():
            (tmp_path / path).write_text("x")
        now = time.time()
        os.utime(tmp_path / files["foreign_recent"], (now - 60, now - 60))
        os.utime(tmp_path / files["foreign_old"], (now - 7200, now - 7200))
        os.utime(tmp_path / files["legacy_old"], (0, 0))
        assert remove_stale_parts(tmp_path) == 3
        left = {key for key, path in files.items() if (tmp_path / path).exists()}
        assert left == {"alive", "mine", "foreign_recent", "output"}
        # restricted to named outputs, and to subfolders only when asked
        sub = tmp_path / "rl"
        sub.mkdir()
        (sub / files["dead"]).write_text("x")
        (tmp_path / f".other.json.{io._HOST}-{dead_pid}.g7.part").write_text("x")
        assert remove_stale_parts(tmp_path, names=["last.ckpt"]) == 0
        assert remove_stale_parts(tmp_path, names=["last.ckpt"], recursive=True) == 1
        assert remove_stale_parts(tmp_path, names=["other.json"]) == 1
    finally:
        alive.kill()
        alive.wait()
