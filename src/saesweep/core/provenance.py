"""Provenance that travels with every artifact: package version, git commit, settings hash,
and, for the jobs whose speed is reported (training, evaluation), the hardware they ran on."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import torch

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


@cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware(device: torch.device, processes: int = 1) -> dict[str, Any]:
    """What a job ran on, so that its speed columns can be read: the CPU model and the CPU cores
    it could use, the job's number of processes (the ranks of a distributed cell), the GPU's
    name (``none`` on the CPU) and count (one per process on CUDA), and the torch and CUDA
    versions (``none`` for a CPU build)."""
    return {
        "cpu": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "processes": processes,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "gpu_count": processes if device.type == "cuda" else 0,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "none",
    }


def provenance(settings: dict[str, Any], device: torch.device | None = None, processes: int = 1) -> dict[str, Any]:
    """The provenance block stored in every artifact made from ``settings``; with the job's
    ``device`` (and its number of ``processes``), also its ``hardware``."""
    block: dict[str, Any] = {
        "package_version": __version__,
        "git_commit": git_commit(),
        "settings_hash": settings_hash(settings),
    }
    if device is not None:
        block["hardware"] = hardware(device, processes)
    return block
