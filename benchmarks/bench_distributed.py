"""One TopK training step of a large SAE split over 1, 2 and 4 latent shards (gloo).

    .venv/bin/python benchmarks/bench_distributed.py [--n 65536] [--d 576] [--k 32]
                                                     [--batch 1024] [--ranks 1 2 4] [--steps 4]

For each number of ranks S, S processes (torch.distributed, gloo on the CPU, one torch
thread each) train the latent-sharded TopK step of ``saesweep.train.distributed`` (merge
of the per-shard top-k, all-reduced reconstructions, AuxK over 10% dead latents, Adam,
decoder renormalisation) on the same random batch. Each rank reports:

    state MiB   = bytes of its parameters and Adam moments (exact: Σ numel · element size);
                  with S shards it holds n/S latents, so this falls as 1/S (b_pre, d floats,
                  is the only replicated tensor);
    peak RSS    = the process's peak resident memory (ru_maxrss), interpreter and torch included;
    step ms     = median over the timed steps (one untimed step first) of the whole step.

Step times are wall-clock on whatever cores the machine gives: on a 2-core machine four
ranks share two cores, so time per step measures the communication and the contention
there, not the speed-up S GPUs would give. The state column is what the sharding is for.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from saesweep.sae.base import StepContext
from saesweep.sae.topk import TopKSAE
from saesweep.core.job_settings import DistributedSettings
from saesweep.train.distributed import Placement, free_port, init_process_groups
from saesweep.train.trainer import make_adam

DEAD_FRACTION = 0.1


def rank_main(rank: int, args: argparse.Namespace, ranks: int, port: int, out: str) -> None:
    """One rank: build its shard (random, unit-norm decoder rows), time the steps, write a JSON line."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed = DistributedSettings(data_parallel=1, latent_shards=ranks, timeout_s=600)
    groups = init_process_groups(distributed, args.n, Placement(rank, ranks, rank), torch.device("cpu"))
    sae = TopKSAE(args.d, args.n, {"k": args.k, "lr_factor": 1.0})
    groups.shard_module(sae)
    generator = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=generator))
        sae.after_optimizer_step()
        sae.W_enc.copy_(sae.W_dec)
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    optimizer = make_adam(sae.parameters(), 1e-4, 6.25e-10)
    x = torch.randn(args.batch, args.d, generator=torch.Generator().manual_seed(1234))
    dead = torch.rand(groups.n_local, generator=generator) < DEAD_FRACTION
    context = StepContext(dead, args.d // 2, 1 / 32, 0.5, 1e-3, collectives=groups)
    times = []
    for step in range(args.steps + 1):
        torch.distributed.barrier()
        start = time.perf_counter()
        sae.training_step(x, context)
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
        torch.distributed.barrier()
        if step:
            times.append(time.perf_counter() - start)
    tensors = [*sae.parameters(), *(t for state in optimizer.state.values() for t in state.values() if t.dim())]
    result = {
        "ranks": ranks,
        "rank": rank,
        "state_mib": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_ms": 1e3 * statistics.median(times),
    }
    with open(out, "a") as handle:
        handle.write(json.dumps(result) + "\n")
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "results.jsonl")
        for ranks in args.ranks:
            mp.spawn(rank_main, (args, ranks, free_port(), out), nprocs=ranks)
        rows = [json.loads(line) for line in Path(out).read_text().splitlines()]
    print(f"n={args.n} d={args.d} k={args.k} B={args.batch}, TopK with AuxK ({DEAD_FRACTION:.0%} dead), gloo, 1 thread per rank")
    print("| ranks (S) | state MiB per rank | × 1 rank | peak RSS MiB per rank (max) | step ms (median, max over ranks) |")
    print("|---|---|---|---|---|")
    single = max(row["state_mib"] for row in rows if row["ranks"] == min(args.ranks))
    for ranks in args.ranks:
        group = [row for row in rows if row["ranks"] == ranks]
        state = max(row["state_mib"] for row in group)
        print(
            f"| {ranks} | {state:,.1f} | {state / single:.3f} | {max(row['peak_rss_mib'] for row in group):,.0f} "
            f"| {max(row['step_ms'] for row in group):,.0f} |"
        )


if __name__ == "__main__":
    main()
