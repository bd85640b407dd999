"""One cell trained by D·S processes with torch.distributed (``train.distributed``).

Layout: rank r = replica · S + shard. The S ranks of a replica hold the n latents split in
contiguous blocks of n/S (shard s: latents [s·n/S, (s+1)·n/S), i.e. those rows of W_enc,
b_enc, W_dec and of every per-latent tensor; b_pre and the normalisation replicated); the
D replicas of a shard take disjoint slices of every global batch (rows
[j·B/D, (j+1)·B/D) of the batch the single-process run would take, so the same seed gives
the same batches). Neighbouring ranks share latents' work (a top-k merge and a (B, d)
all-reduce per step) and sit on the same node when launched by torchrun or srun.

Per step (``ProcessGroups``, the torch.distributed ``Collectives``): the training step
merges selections over the shard group and sums partial reconstructions there; V and the
loss numerators are summed over the data-parallel group, so each replica's gradients are
its share of the single-process ones and their sum (an all-reduce over the replicas) is
the single-process gradient. Adam, the decoder-gradient projection and the decoder
renormalisation act per element or per latent, so they need nothing more. A latent fired
in the batch when it fired on some replica's slice (an all-reduce of the firing mask).

Checkpoints: replica 0 of every shard writes its shard (weights, Adam state and dead-latent
counters of its latents) to ``checkpoint-{tokens}-shard{s}of{S}.pt``, all ranks meet, then
rank 0 writes ``checkpoint.pt`` (tokens, log, RNG state and the names of the shard files),
each file atomically: ``checkpoint.pt`` only ever names a complete set of shards, and a
rerun resumes from it. The exported SAE is gathered to rank 0 and written as one ordinary
SAE.

Launch: ``saesweep train`` started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or as the
tasks of an ``srun`` step (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) is one rank;
otherwise it starts the D·S ranks itself on this machine and fails, naming the rank, as
soon as one of them fails (the others are stopped).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException
from torch import nn

from saesweep.core.errors import Interrupted, UserError
from saesweep.core.files import atomic_path
from saesweep.core.job_settings import DistributedSettings, TrainSettings
from saesweep.sae.base import SparseAutoencoder
from saesweep.sae.collectives import Collectives
from saesweep.sae.registry import build_sae
from saesweep.train.checkpoints import CHECKPOINT, fits, read_checkpoint

EXIT_INTERRUPTED = 143
"""A rank's exit code after SIGTERM and its checkpoint (as ``saesweep train``'s)."""
EXIT_USER_ERROR = 2
"""A rank's exit code after a UserError (as ``saesweep train``'s)."""


@dataclass(frozen=True)
class Layout:
    """Where one rank sits: D data-parallel replicas × S latent shards."""

    data_parallel: int
    latent_shards: int
    rank: int = 0

    @classmethod
    def of(cls, distributed: DistributedSettings | None, rank: int = 0) -> Layout:
        """The layout of a cell's ``distributed`` settings (1 × 1 without them)."""
        if distributed is None:
            return cls(1, 1, rank)
        return cls(distributed.data_parallel, distributed.latent_shards, rank)

    @property
    def world(self) -> int:
        return self.data_parallel * self.latent_shards

    @property
    def shard(self) -> int:
        return self.rank % self.latent_shards

    @property
    def replica(self) -> int:
        return self.rank // self.latent_shards

    def latent_block(self, n: int) -> tuple[int, int]:
        """[start, stop) of this shard's latents (n is a multiple of S)."""
        size = n // self.latent_shards
        return self.shard * size, (self.shard + 1) * size

    def data_slice(self, batch: torch.Tensor) -> torch.Tensor:
        """This replica's rows of a global batch: rows [j·B/D, (j+1)·B/D) (rounded as
        ``torch.tensor_split`` does)."""
        return batch.tensor_split(self.data_parallel)[self.replica]


def per_latent_names(sae: SparseAutoencoder, rows: int | None = None) -> list[str]:
    """The parameters and buffers split over latent shards: not ``replicated``, with a
    leading dimension of ``rows`` (n for a whole SAE, n/S for a shard's)."""
    rows = sae.n if rows is None else rows
    tensors = [*sae.named_parameters(), *sae.named_buffers()]
    return [name for name, t in tensors if name not in sae.replicated and t.dim() >= 1 and t.shape[0] == rows]


class ProcessGroups(Collectives):
    """The torch.distributed collectives of one rank (see ``sae.collectives``)."""

    def __init__(self, layout: Layout, n: int, device: torch.device) -> None:
        self.layout, self.device = layout, device
        self.shards = layout.latent_shards
        self.offset, stop = layout.latent_block(n)
        self.n_local = stop - self.offset
        S, D = layout.latent_shards, layout.data_parallel
        # every rank creates every group, in the same order (torch.distributed requires it)
        shard_groups = [dist.new_group(list(range(j * S, (j + 1) * S))) for j in range(D)]
        data_groups = [dist.new_group(list(range(s, S * D, S))) for s in range(S)]
        self.shard_group, self.data_group = shard_groups[layout.replica], data_groups[layout.shard]

    def shard_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.shards > 1:
            dist.all_reduce(tensor, group=self.shard_group)
        return tensor

    def shard_count(self, count: int) -> int:
        return int(self.shard_sum(torch.tensor(count, device=self.device)).item())

    def data_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.layout.data_parallel > 1:
            dist.all_reduce(tensor, group=self.data_group)
        return tensor

    def data_count(self, count: int) -> int:
        return int(self.data_sum(torch.tensor(count, device=self.device)).item())

    def batch_variance(self, x: torch.Tensor) -> torch.Tensor:
        """V = Σ_b ‖x_b − m‖² with m the global batch's mean (two sums over replicas)."""
        if self.layout.data_parallel == 1:
            return super().batch_variance(x)
        totals = self.data_sum(torch.cat([x.sum(dim=0), x.new_tensor([len(x)])]))
        mean = totals[:-1] / totals[-1]
        return self.data_sum((x - mean).pow(2).sum())

    def merge(self, values: torch.Tensor, positions: torch.Tensor, k: int,
              ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All-gather every shard's candidates (padded to k with −∞) as (value, global
        latent), take each row's top k, keep this shard's entries (others: value 0, position 0)."""
        if self.shards == 1:
            return values, positions
        # cat / take / index_copy_ rather than Python indexing, which a fake CUDA tensor
        # (tests/test_devices.py) cannot run on a CPU-only torch
        batch, m = values.shape
        latents = positions if ids is None else ids.take(positions)
        padded_values = torch.cat([values, values.new_full((batch, k - m), float("-inf"))], dim=1)
        padded_latents = torch.cat([latents + self.offset, latents.new_zeros((batch, k - m))], dim=1)
        gathered_values = [torch.empty_like(padded_values) for _ in range(self.shards)]
        gathered_latents = [torch.empty_like(padded_latents) for _ in range(self.shards)]
        dist.all_gather(gathered_values, padded_values, group=self.shard_group)
        dist.all_gather(gathered_latents, padded_latents, group=self.shard_group)
        top, chosen = torch.cat(gathered_values, dim=1).topk(k, dim=1, sorted=False)
        latent = torch.cat(gathered_latents, dim=1).gather(1, chosen) - self.offset
        mine = (latent >= 0) & (latent < self.n_local)
        local = latent.where(mine, 0)
        if ids is not None:  # local latent → position in ids
            position_of = torch.zeros(self.n_local, dtype=local.dtype, device=local.device)
            position_of.index_copy_(0, ids, torch.arange(len(ids), dtype=local.dtype, device=local.device))
            local = position_of.take(local)
        return top.where(mine, 0.0), local.where(mine, 0)

    def any_replica(self, mask: torch.Tensor) -> torch.Tensor:
        """Elementwise OR of a bool tensor over the data-parallel replicas."""
        return self.data_sum(mask.to(torch.int32)) > 0

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        value = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank."""
        value = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum_gradients(self, sae: nn.Module) -> None:
        """Σ of every gradient over the data-parallel replicas."""
        if self.layout.data_parallel > 1:
            for parameter in sae.parameters():
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad, group=self.data_group)

    # --- the model's shards ----------------------------------------------------------------

    def shard_module(self, sae: SparseAutoencoder) -> None:
        """Replace every per-latent tensor of a new (uninitialised) SAE by an empty block of
        this shard's rows; ``sae.n`` stays the cell's n."""
        for name in per_latent_names(sae):
            tensor = getattr(sae, name)
            block = tensor.new_empty((self.n_local, *tensor.shape[1:]))
            if isinstance(tensor, nn.Parameter):
                setattr(sae, name, nn.Parameter(block))
            else:
                sae.register_buffer(name, block)

    def local_block(self, full: SparseAutoencoder, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This shard's rows of a full SAE's tensor ``name`` (the tensor itself if replicated)."""
        if name in per_latent_names(full):
            return tensor[self.offset : self.offset + self.n_local]
        return tensor

    def gather_module(self, sae: SparseAutoencoder, arch: str, params: dict[str, Any]) -> SparseAutoencoder | None:
        """The whole SAE (on the CPU) on rank 0, None elsewhere: the per-latent blocks of
        replica 0's shards concatenated in shard order. Every rank of replica 0 must call it."""
        if self.layout.replica != 0:
            return None
        names = set(per_latent_names(sae, self.n_local))
        state = {}
        for name, tensor in sae.state_dict().items():
            if name in names and self.shards > 1:
                parts = [torch.empty_like(tensor) for _ in range(self.shards)] if self.layout.rank == 0 else None
                dist.gather(tensor.contiguous(), parts, dst=0, group=self.shard_group)
                state[name] = torch.cat(parts).cpu() if parts is not None else None
            else:
                state[name] = tensor.detach().cpu()
        if self.layout.rank != 0:
            return None
        full = build_sae(arch, sae.d, sae.n, params)
        full.load_state_dict(state)
        full.input_normalisation = sae.input_normalisation
        return full

    # --- checkpoints -----------------------------------------------------------------------

    def shard_file(self, tokens: int, shard: int | None = None) -> str:
        shard = self.layout.shard if shard is None else shard
        return f"checkpoint-{tokens}-shard{shard}of{self.shards}.pt"

    def save_checkpoint(self, folder: Path, tokens: int, shard_state: dict[str, Any], shared_state: dict[str, Any]) -> None:
        """Shards (replica 0), then, once every shard is on disk, the shared state naming
        them (rank 0), then older shard files go; every rank returns only when all is written."""
        if self.layout.replica == 0:
            with atomic_path(folder / self.shard_file(tokens)) as temporary:
                torch.save(shard_state, temporary)
        dist.barrier()
        if self.layout.rank == 0:
            names = [self.shard_file(tokens, s) for s in range(self.shards)]
            with atomic_path(folder / CHECKPOINT) as temporary:
                torch.save({**shared_state, "layout": self.layout_key(), "shards": names}, temporary)
            for old in folder.glob("checkpoint-*-shard*.pt"):
                if int(old.name.split("-")[1]) < tokens:
                    old.unlink(missing_ok=True)
        dist.barrier()

    def layout_key(self) -> list[int]:
        return [self.layout.data_parallel, self.shards]

    def load_checkpoint(self, folder: Path, settings_hash: str, sae: nn.Module) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(shared state, this shard's state) of the last complete checkpoint made from the
        same settings and layout whose shard fits ``sae`` (this rank's, ``checkpoints.fits``),
        or None (on every rank alike) when there is none. A checkpoint file that cannot be
        read is a UserError on every rank, the one that read it naming it."""
        path = folder / CHECKPOINT
        found, damage = None, None
        if path.exists():
            try:
                shared = read_checkpoint(path, torch.device("cpu"), ("settings_hash",))
                if shared["settings_hash"] != settings_hash or shared.get("layout") != self.layout_key():
                    print(f"ignoring checkpoint {path}: made from other settings", file=sys.stderr)
                else:
                    shard_path = folder / shared["shards"][self.layout.shard]
                    shard = read_checkpoint(shard_path, self.device, ("sae",))
                    found = (shared, shard) if fits(shard_path, shard["sae"], sae) else None
            except UserError as error:
                damage = str(error)
        if self.any_true(damage is not None):
            raise UserError(damage or f"checkpoint {path}: another rank cannot read its checkpoint file (its message names it)")
        return found if self.all_true(found is not None) else None

    def remove_checkpoint(self, folder: Path) -> None:
        """After the outputs are written (rank 0)."""
        if self.layout.rank == 0:
            (folder / CHECKPOINT).unlink(missing_ok=True)
            for old in folder.glob("checkpoint-*-shard*.pt"):
                old.unlink(missing_ok=True)


# --- launching ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """This process's rank, the world size and its rank on its node."""

    rank: int
    world: int
    local_rank: int


def placement_from_environment() -> Placement | None:
    """The rank given by torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or by an srun step of
    several tasks (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); None when neither started us."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Placement(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = slurm_first_node()
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return Placement(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return None


def slurm_first_node() -> str:
    """The first host of the step (``scontrol show hostnames``), where rank 0 runs."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        names = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return names.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def init_process_groups(
    distributed: DistributedSettings, n_latents: int, placement: Placement, device: torch.device
) -> ProcessGroups:
    """Join the job's process group (NCCL on CUDA, gloo on the CPU) with the settings'
    timeout, after checking that the world is the layout's, for a cell of ``n_latents``."""
    layout = Layout.of(distributed, placement.rank)
    if placement.world != layout.world:
        raise UserError(
            f"train.distributed asks for {layout.data_parallel} × {layout.latent_shards} = {layout.world} "
            f"processes but this one was started as rank {placement.rank} of {placement.world}"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=distributed.timeout_s)
    dist.init_process_group(backend, rank=placement.rank, world_size=placement.world, timeout=timeout)
    return ProcessGroups(layout, n_latents, device)


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn(worker: Callable[..., None], settings: TrainSettings, folder: Path, threads: int | None) -> None:
    """Run ``worker(index, settings, folder, threads)`` as the D·S ranks of the cell on this
    machine (rank = index). When a rank fails, the others are stopped and a UserError names
    it; SIGTERM is passed on to every rank (each then checkpoints) and ends in Interrupted."""
    world = Layout.of(settings.distributed).world
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        context = mp.start_processes(worker, (settings, folder, threads), nprocs=world, join=False, start_method="spawn")
    finally:
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
    terminated: list[int] = []

    def pass_on(signum: int, _frame: Any) -> None:
        terminated.append(signum)
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        while not context.join(timeout=1.0, grace_period=30.0):
            pass
    except ProcessException as failure:
        code = getattr(failure, "exit_code", None)
        if terminated and code in (EXIT_INTERRUPTED, -signal.SIGTERM):
            raise Interrupted(f"SIGTERM: the {world} ranks of {folder} stopped at their last checkpoint") from None
        if code is None:  # an unexpected exception: its traceback, which the rank could not print
            print(failure, file=sys.stderr, flush=True)
        how = "raised an exception (traceback above)" if code is None else (
            f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        )
        then = "its error is above" if code == EXIT_USER_ERROR else "a rerun resumes from the last complete checkpoint"
        raise UserError(
            f"cell {folder}: rank {failure.error_index} of {world} {how}; the other ranks were stopped; {then}"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
