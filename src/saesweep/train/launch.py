"""Starting a cell's training: in this process, as one rank of a distributed cell started by
torchrun or srun, or by starting the cell's ranks here (``train.distributed``)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from saesweep.core.devices import resolve_device
from saesweep.core.errors import Interrupted, UserError
from saesweep.core.job_settings import TrainSettings
from saesweep.train.distributed import (
    EXIT_INTERRUPTED, EXIT_USER_ERROR, Layout, Placement, init_process_groups, placement_from_environment, spawn,
)
from saesweep.train.trainer import DEVICE_KEY, Trainer


def train_cell(settings: TrainSettings, folder: Path, threads: int | None = None) -> None:
    """Train (or resume) the cell described by ``settings`` into ``folder`` with ``threads``
    CPU threads (None: torch's default): in this process, as one rank of a distributed cell
    started by torchrun or srun, or by starting the cell's ranks here (``train.distributed``)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    if Layout.of(settings.distributed).world == 1:
        torch.set_num_threads(threads or torch.get_num_threads())
        Trainer(settings, folder).run()
        return
    placement = placement_from_environment()
    if placement is None:
        spawn(spawned_rank, settings, Path(folder), threads)
    else:
        if threads:
            torch.set_num_threads(threads)
        train_rank(settings, Path(folder), placement)


def train_rank(settings: TrainSettings, folder: Path, placement: Placement) -> None:
    """One rank of a distributed cell: join the process group, train, leave it. On CUDA each
    rank takes one GPU: its local rank among the GPUs it sees."""
    device = resolve_device(settings.device, DEVICE_KEY)
    if device.type == "cuda":
        device = torch.device("cuda", placement.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    groups = init_process_groups(settings.distributed, settings.n_latents, placement, device)
    try:
        Trainer(settings, folder, groups).run()
    except Interrupted:
        # every rank stopped after the same step (``ProcessGroups.any_true``): none leaves the
        # group while another still has a collective in flight
        torch.distributed.barrier()
        raise
    finally:
        torch.distributed.destroy_process_group()


def spawned_rank(index: int, settings: TrainSettings, folder: Path, threads: int | None) -> None:
    """Rank ``index`` started by ``distributed.spawn``: the job's threads shared out, errors
    reported in one line and as ``saesweep train``'s exit codes."""
    world = Layout.of(settings.distributed).world
    torch.set_num_threads(max(1, (threads or torch.get_num_threads()) // world))
    try:
        train_rank(settings, folder, Placement(index, world, index))
    except UserError as error:
        print(f"saesweep train: rank {index}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except Interrupted as interruption:
        print(f"saesweep train: rank {index}: {interruption}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
