"""Provenance of a run: the code (git commit, package versions) that made its numbers."""
from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ["auditbench", "torch", "torchvision", "timm", "captum", "numpy", "pandas", "scikit-image", "scikit-learn", "scipy"]


def git_commit() -> str | None:
    """The commit of the auditbench checkout that ran (``+dirty`` with uncommitted changes), or None
    where auditbench is not a git checkout (an installed wheel) or git is absent."""
    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10)
        lines = head.stdout.split()
        # Only auditbench's own checkout: an installed package can sit inside somebody else's repository.
        if head.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != here.parent:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return lines[1] + ("+dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
