"""Where the project's files live: the repository root and its default inputs (stdlib only)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The shared CIFAR-10 archive, beside the repository.
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# The committed reference checkpoint.
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "mwresnet56_5.safetensors"
