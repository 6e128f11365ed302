"""Full disks for the fault tests: a tmpfs of a given size (mounted as root; a test skips, saying why, where mounting
is not permitted) and a ballast file that fills it to the last byte."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest


def mount_tmpfs(path: Path, size_mb: int) -> Path:
    """Mount a tmpfs of `size_mb` MB at `path` (created); skips the calling test where that is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        why = r.stderr.strip() or "mount failed"
        pytest.skip(
            f"a full disk needs a small filesystem: cannot mount a tmpfs at {path} ({why}); run the tests as "
            "root with CAP_SYS_ADMIN"
        )
    return path


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path, name: str = "ballast", leave: int = 0) -> Path:
    """Write a file under `directory` until its filesystem has not one byte left (or about `leave` bytes); returns it
    (unlink it to free the space)."""
    ballast = directory / name
    with open(ballast, "ab", buffering=0) as f:
        if leave:
            f.write(b"\0" * max(0, shutil.disk_usage(directory).free - leave))
            return ballast
        for chunk in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    f.write(b"\0" * chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    return ballast
