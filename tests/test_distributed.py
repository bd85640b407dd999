"""One cell trained by several processes (train.distributed, gloo on the CPU): latent shards,
data-parallel replicas and both give the single-process step and training; a rank that
dies fails the job with a message naming it, SIGTERM makes every rank checkpoint, and a
rerun resumes to the weights of an uninterrupted distributed run, bit for bit.

Tolerances. One step: the distributed step computes the single-process formulas with sums
split differently (the encoder product per block of latents, reconstructions and V as
sums of per-shard and per-replica parts), so losses and gradients agree to fp32 round-off:
the tests allow 1e-5 of the largest entry of each gradient (seen: up to 1.2e-6, on
b_pre, whose gradient is a difference of two larger sums).
Whole runs: Adam keeps a relative difference of the gradients relative in the update, so
curves stay within ~1e-6 (seen for data-parallel and for Multi-TopK over 4 shards), until
a top-k selection meets an exact fp32 tie: seed 1 of topk-n256-k4 has two latents at
exactly 1.7911735 in 4th and 5th place for one token at step 18, and one top-k over all n
keeps one of them while the merge of per-shard top-k's keeps the other (both are valid
selections). From there the runs are two equally valid trainings that differ by one
latent of one token in one step: 2e-3 relative on the curve and 8e-3 on the weights at
the end. Whole runs are therefore held to 1e-2 relative on the curves and 2e-2 absolute
on the weights (unit-norm decoder rows, entries ~0.2), far below what a wrong gradient
gives (the loss would not follow the single-process one at all).
"""

from __future__ import annotations

import os
from dataclasses import replace
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import CPU, TIMING_COLUMNS, assert_same_training, read_log
from saesweep.core.errors import UserError
from saesweep.core.files import write_json
from saesweep.core.job_settings import DistributedSettings, TrainSettings, to_json
from saesweep.plan.config import validate_config
from saesweep.sae.export import load_sae
from saesweep.sae.base import StepContext
from saesweep.sae.registry import ARCHITECTURES, build_sae, resolve_params
from saesweep.train.distributed import CHECKPOINT, Placement, free_port, init_process_groups
from saesweep.train.launch import train_cell
from test_train import cell_settings, extracted  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# AuxK acts here: the dead window (2000 tokens) is short against the budget (12000)
CELL = "topk-n256-k4-ka16-s1"
OVERRIDES = {"train.log_every_tokens": 512}


def distributed(settings: TrainSettings, data_parallel: int, latent_shards: int) -> TrainSettings:
    return replace(settings, distributed=DistributedSettings(data_parallel, latent_shards, 60))


@pytest.fixture(scope="module")
def single(extracted, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """Each cell trained by one process."""
    folders = {}
    for cell in (CELL, "multitopk-n256-k4-ka16-s1", "gated-n256-l1-s1"):
        folders[cell] = tmp_path_factory.mktemp("single") / "cell"
        train_cell(cell_settings(extracted, cell, **OVERRIDES), folders[cell], threads=1)
    return folders


def assert_close_training(a: Path, b: Path) -> None:
    """Same log rows and columns, values within the module docstring's tolerance, weights too."""
    left, right = (read_log(folder).drop(columns=TIMING_COLUMNS) for folder in (a, b))
    pd.testing.assert_frame_equal(left, right, rtol=1e-2, atol=1e-6)
    weights_a, weights_b = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert sorted(weights_a) == sorted(weights_b)
    for name in weights_a:
        assert weights_a[name].shape == weights_b[name].shape, name
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=2e-2, msg=name)


def step_gradients(sae, x: torch.Tensor, dead: torch.Tensor, normaliser: str,
                   collectives=None) -> dict[str, torch.Tensor]:
    """Loss parts and gradients of one training step (AuxK on, k_aux = 16, α = 1/32, L_aux
    divided by ``normaliser``'s variance)."""
    context = StepContext(dead, 16, 1 / 32, 0.5, 1e-3, aux_normaliser=normaliser, collectives=collectives)
    out = sae.training_step(x, context)
    if collectives is not None:
        collectives.sum_gradients(sae)
    return {**{name: part for name, part in out.parts.items()}, **{name: p.grad for name, p in sae.named_parameters()}}


def step_problem(arch: str, dead_fraction: float, normaliser: str = "input", seed: int = 0):
    """An initialised SAE (d = 32, n = 256; k = 4, or the architecture's example setting), a
    batch of 64 and a dead mask."""
    generator = torch.Generator().manual_seed(seed)
    params = resolve_params(arch, {"k": 4} if arch in ("topk", "multitopk") else ARCHITECTURES[arch].example, "test")
    sae = build_sae(arch, 32, 256, params)
    sae.initialise(torch.randn(200, 32, generator=generator), generator)
    dead = torch.rand(256, generator=generator) < dead_fraction
    with torch.no_grad():  # dead latents as training leaves them: mostly negative pre-activations
        sae.b_enc[dead] = -0.5
    return sae, torch.randn(64, 32, generator=generator), dead


def compare_steps(rank: int, layout: tuple[int, int], port: int, expected: dict) -> None:
    """Rank ``rank``: the distributed step of every problem against the single-process one."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed = DistributedSettings(data_parallel=layout[0], latent_shards=layout[1], timeout_s=60)
    groups = init_process_groups(distributed, 256, Placement(rank, layout[0] * layout[1], rank), CPU)
    try:
        for key, reference in expected.items():
            full, x, dead = step_problem(*key)
            sae = build_sae(key[0], 32, 256, full.params)
            groups.shard_module(sae)
            with torch.no_grad():
                for name, parameter in full.named_parameters():
                    sae.get_parameter(name).copy_(groups.local_block(full, name, parameter))
            start, stop = groups.offset, groups.offset + groups.n_local
            got = step_gradients(sae, groups.layout.data_slice(x), dead[start:stop], key[2], groups)
            for name, value in reference.items():
                if value.dim() and name != "b_pre":
                    value = value[start:stop]
                scale = value.abs().max().clamp_min(1e-12)
                assert (got[name] - value).abs().max() <= 1e-5 * scale, (key, layout, rank, name)
    finally:
        torch.distributed.destroy_process_group()


SHARDABLE = [name for name, cls in ARCHITECTURES.items() if cls.shardable]


def test_every_architecture_but_batchtopk_can_be_distributed() -> None:
    assert SHARDABLE == ["topk", "multitopk", "relu", "jumprelu", "gated"]


@pytest.mark.parametrize("layout", [(1, 2), (2, 1), (2, 2), (1, 4)])
def test_the_distributed_step_is_the_single_process_step(layout) -> None:
    """Loss parts and gradients of every shardable architecture, TopK and Multi-TopK with many
    (half) and few (1%) dead latents (AuxK over all of them, or some shards without any; L_aux
    over V or over the error's variance), on every rank."""
    expected = {}
    problems = [(arch, 0.5, "input") for arch in SHARDABLE]
    problems += [("topk", 0.01, "input"), ("multitopk", 0.01, "input"), ("topk", 0.5, "error"), ("topk", 0.01, "error")]
    for key in problems:
        sae, x, dead = step_problem(*key)
        expected[key] = {name: value.clone() for name, value in step_gradients(sae, x, dead, key[2]).items()}
        if ARCHITECTURES[key[0]].uses_auxk:
            assert expected[key]["aux_loss"] > 0
    mp.spawn(compare_steps, (layout, free_port(), expected), nprocs=layout[0] * layout[1])


@pytest.mark.parametrize(
    ("cell", "data_parallel", "latent_shards"),
    [(CELL, 1, 2), (CELL, 2, 1), (CELL, 2, 2), ("multitopk-n256-k4-ka16-s1", 1, 4), ("gated-n256-l1-s1", 2, 2)],
)
def test_distributed_training_is_the_single_process_training(
    extracted, single, tmp_path, cell, data_parallel, latent_shards  # noqa: F811
) -> None:
    settings = distributed(cell_settings(extracted, cell, **OVERRIDES), data_parallel, latent_shards)
    train_cell(settings, tmp_path / "cell", threads=1)
    log = read_log(tmp_path / "cell")
    if cell.startswith(("topk", "multitopk")):  # AuxK and dead tracking were exercised
        assert log.dead_fraction.max() > 0 and log.aux_loss.max() > 0
    assert_close_training(single[cell], tmp_path / "cell")
    # the export is one ordinary SAE, read as any other; no checkpoint file is left
    sae, cfg = load_sae(tmp_path / "cell", CPU)
    assert sae.W_enc.shape == (256, 32) and cfg["n_latents"] == 256
    assert not list((tmp_path / "cell").glob("checkpoint*"))


def test_config_refuses_what_cannot_be_distributed(tiny_model, tiny_corpus) -> None:
    from conftest import tiny_config

    with pytest.raises(UserError, match=r"train\.distributed: architecture batchtopk cannot be trained"):
        validate_config(tiny_config(tiny_model, tiny_corpus, **{
            "sweep.archs": {"batchtopk": {"k": [4]}}, "train.distributed.latent_shards": 2,
        }))
    with pytest.raises(UserError, match=r"train\.distributed\.latent_shards: 3 does not divide n_latents = 64"):
        validate_config(tiny_config(tiny_model, tiny_corpus, **{"train.distributed.latent_shards": 3}))
    config = validate_config(tiny_config(tiny_model, tiny_corpus, **{"train.distributed.data_parallel": 2}))
    assert config["train"]["distributed"] == {"data_parallel": 2, "latent_shards": 1, "timeout_s": 600}


# long enough to be stopped after a checkpoint
LONG = {"train.tokens.base": 20000, "train.checkpoint_every_tokens": 2560}


def worker_pids(launcher: int) -> list[int]:
    """The ranks started by ``saesweep train`` (multiprocessing's spawned children)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.fixture(scope="module")
def uninterrupted(extracted, tmp_path_factory) -> tuple[Path, Path]:  # noqa: F811
    """A two-shard cell trained without interruption, and its settings file."""
    settings = distributed(cell_settings(extracted, "topk-n512-k8-s2", **LONG), 1, 2)
    folder = tmp_path_factory.mktemp("uninterrupted")
    train_cell(settings, folder / "cell", threads=1)
    write_json(folder / "settings.json", to_json(settings))
    return folder / "cell", folder / "settings.json"


def start_after_checkpoint(settings: Path, folder: Path) -> tuple[subprocess.Popen, list[str]]:
    """``saesweep train`` of the cell in a subprocess, returned once its first checkpoint exists."""
    command = [sys.executable, "-m", "saesweep.cli", "train", "--settings", str(settings), "--out", str(folder),
               "--threads", "2"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not (folder / CHECKPOINT).exists():
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the job ended"
        time.sleep(0.05)
    return process, command


def resume(command: list[str], folder: Path, uninterrupted: Path) -> None:
    rerun = subprocess.run(command, stderr=subprocess.PIPE, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stderr
    assert_same_training(uninterrupted, folder)
    assert not list(folder.glob("checkpoint*"))


def test_a_dead_rank_fails_the_job_and_a_rerun_resumes(uninterrupted, tmp_path) -> None:
    folder = tmp_path / "killed"
    process, command = start_after_checkpoint(uninterrupted[1], folder)
    os.kill(worker_pids(process.pid)[1], signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    assert "rank 1 of 2 was killed by signal SIGKILL" in stderr and "resumes" in stderr
    assert not (folder / "sae.safetensors").exists()
    resume(command, folder, uninterrupted[0])


def test_sigterm_checkpoints_every_rank_and_a_rerun_resumes(uninterrupted, tmp_path) -> None:
    folder = tmp_path / "terminated"
    process, command = start_after_checkpoint(uninterrupted[1], folder)
    first = (folder / CHECKPOINT).stat().st_mtime_ns
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert (folder / CHECKPOINT).stat().st_mtime_ns > first  # written on SIGTERM, by every rank
    assert len(list(folder.glob("checkpoint-*-shard*of2.pt"))) == 2
    resume(command, folder, uninterrupted[0])


def test_a_damaged_checkpoint_shard_is_refused_by_name(extracted, tmp_path) -> None:  # noqa: F811
    """Shard 1's checkpoint file truncated after a SIGTERM: the rerun stops with exit 2 (no
    rank waits for the one that failed), rank 1 naming the file and how to delete the
    checkpoints; nothing is trained and the files stay for inspection."""
    settings = distributed(cell_settings(extracted, "topk-n512-k8-s2", **LONG), 1, 2)
    write_json(tmp_path / "settings.json", to_json(settings))
    folder = tmp_path / "cell"
    process, command = start_after_checkpoint(tmp_path / "settings.json", folder)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    (shard,) = folder.glob("checkpoint-*-shard1of2.pt")
    shard.write_bytes(shard.read_bytes()[:-1000])
    rerun = subprocess.run(command, stderr=subprocess.PIPE, text=True, timeout=600)
    assert rerun.returncode == 2, rerun.stderr
    assert f"rank 1: error: checkpoint {shard} cannot be read" in rerun.stderr
    assert f"rm {folder}/checkpoint*.pt" in rerun.stderr and "its error is above" in rerun.stderr
    assert "resuming from" not in rerun.stderr and "Traceback" not in rerun.stderr
    assert shard.exists() and not (folder / "sae.safetensors").exists()
