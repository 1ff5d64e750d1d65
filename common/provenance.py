"""How a number was made: commit, machine and date (stdlib only).

Every file that records a result (checkpoint metadata, evaluations, manifests,
benchmark summaries) takes these from here, so they read the same everywhere.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess

from common.paths import REPO_ROOT


def git_commit() -> str:
    """The repository's HEAD commit, with "-dirty" when tracked files have changed."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                                  timeout=10).stdout.strip()

        commit = git("rev-parse", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_description(accelerator: str | None = None) -> str:
    """`host (arch, N CPU cores[, accelerator])`; callers with torch pass the GPU name."""
    details = [platform.machine(), f"{os.cpu_count()} CPU cores"] + ([accelerator] if accelerator else [])
    return f"{platform.node()} ({', '.join(details)})"


def utc_timestamp() -> str:
    """Now, in UTC, ISO 8601 to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
