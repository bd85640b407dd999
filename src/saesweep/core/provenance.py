"""Provenance that travels with every artifact: package version, git commit, settings hash."""

from __future__ import annotations

import hashlib
import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

from saesweep import __version__


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal settings give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def settings_hash(settings: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a stage's resolved settings (first 16 hex digits)."""
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:16]


@cache
def git_commit() -> str:
    """The commit of the checkout this package runs from, with ``-dirty`` when it has
    uncommitted changes, or ``unknown`` outside a git checkout."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def provenance(settings: dict[str, Any]) -> dict[str, str]:
    """The provenance block stored in every artifact made from ``settings``."""
    return {
        "package_version": __version__,
        "git_commit": git_commit(),
        "settings_hash": settings_hash(settings),
    }
