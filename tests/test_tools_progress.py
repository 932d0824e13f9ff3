"""Long one-off steps show a progress bar on a terminal (and nothing extra in a log file):
unpacking an EXECUTION_ENV_PATH archive, run for real through a pseudo-terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import pexpect

UNPACK = ("import sys, pathlib; from triserve.backends.python.environment import unpack_archive; "
          "print('unpacked into', unpack_archive(pathlib.Path(sys.argv[1])))")


def make_archive(path) -> None:
    payload = os.urandom(3 << 20)  # incompressible: the bar has bytes to count
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("env/bin/python", b"#!/bin/sh\n"), ("env/lib/blob.bin", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_unpacking_an_env_archive_shows_a_bar_on_a_terminal_only(tmp_path):
    archive = tmp_path / "python-3-11.tar.gz"
    make_archive(archive)
    env = {**os.environ, "TRISERVE_CACHE_DIR": str(tmp_path / "cache"), "TERM": "xterm", "COLUMNS": "120"}
    child = pexpect.spawn(sys.executable, ["-c", UNPACK, str(archive)], env=env, encoding="utf-8",
                          timeout=120, dimensions=(40, 120))
    child.expect(pexpect.EOF)
    shown = child.before
    assert "unpacking python-3-11.tar.gz" in shown
    assert "3.1 MB" in shown or "3.1/3.1 MB" in shown  # rich's byte count of the archive read
    assert "unpacked into" in shown
    assert (tmp_path / "cache" / "envs").is_dir()
    assert any(path.name == "blob.bin" for path in (tmp_path / "cache" / "envs").rglob("blob.bin"))

    # in a log file (no terminal) the step prints nothing of its own
    archive2 = tmp_path / "other.tar.gz"
    make_archive(archive2)
    result = subprocess.run([sys.executable, "-c", UNPACK, str(archive2)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.startswith("unpacked into")
