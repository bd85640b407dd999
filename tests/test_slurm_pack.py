"""Packing cells into SLURM jobs (profiles/slurm-pack on top of profiles/slurm), on the real
local cluster of slurm_cluster.py:

1. the 2-cell tiny sweep submits one job for both cells' training and evaluation (instead
   of four), that job asks for one GPU and runs its cells in sequence, and cells.parquet
   equals that of a local `snakemake --cores 2` run of the same config;
2. a pack cancelled with scancel once one of its cells is trained and the other has a
   checkpoint: Snakemake removes the pack's outputs (its jobs all count as failed) but the
   checkpoint stays; the rerun trains the finished cell again from scratch and resumes the
   other from its checkpoint, and both end with the weights of an uninterrupted local run.

Both tests share one cluster and one pair of sweep folders and run in file order. Skipped
with the reason when no local SLURM cluster can be had (see slurm_cluster.py).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, tiny_config, write_config
from test_slurm_workflow import (  # slurm_cluster: the module's local SLURM cluster fixture
    BIG,
    LOCAL_RULES,
    RUN,
    SITE,
    SMALL,
    SWEEP,
    SlurmRun,
    Sweeps,
    assert_same_cells,
    assert_same_sources,
    assert_same_train_log,
    assert_same_weights,
    cell_dir,
    finish_local,
    local_snakemake,
    rule_of,
    slurm_cluster,
    slurm_snakemake,
    source_digests,
)

pytestmark = pytest.mark.slurm

PACK = ["--workflow-profile", str(REPO / "profiles" / "slurm-pack")]
PACKED_RULES = {"train_cell", "evaluate_cell"}
GROUP = "pack_evaluate_cell_train_cell"  # the group job's name in its SLURM comment


@pytest.fixture(scope="module")
def packed(slurm_cluster, tmp_path_factory, tiny_model, tiny_corpus) -> Sweeps:
    """The 2-cell tiny sweep through SLURM with packing, and the same config run locally."""
    base = tmp_path_factory.mktemp("slurm-pack")
    slurm_dir, local_dir = base / "slurm", base / "local"
    for folder in (slurm_dir, local_dir):
        folder.mkdir()
        write_config(folder / "config.yaml", tiny_config(tiny_model, tiny_corpus, **SWEEP))
    sources = source_digests()
    local = local_snakemake(local_dir, slurm_cluster)
    try:
        run = slurm_snakemake(slurm_cluster, slurm_dir, *PACK)
    finally:
        finish_local(local, local_dir)
    assert run.returncode == 0, run.output[-5000:]
    return Sweeps(slurm_dir, local_dir, run, sources)


def packed_job(run: SlurmRun) -> tuple[int, dict[str, str]]:
    (job_id, job), = [(i, j) for i, j in run.jobs.items() if rule_of(j) == GROUP]
    return job_id, job


def test_packed_sweep_submits_fewer_jobs_and_equals_a_local_run(packed: Sweeps, slurm_cluster) -> None:
    run = packed.run
    stats = run.job_stats()
    assert stats["train_cell"] == stats["evaluate_cell"] == 2, stats
    # one job per rule outside the pack, one job for the 4 jobs inside it
    unpacked = Counter({rule: n for rule, n in stats.items() if rule not in LOCAL_RULES})
    expected = Counter({rule: n for rule, n in unpacked.items() if rule not in PACKED_RULES}) + Counter({GROUP: 1})
    print(f"packed: {len(run.new_ids)} sbatch jobs ({dict(run.rules())}); unpacked: {sum(unpacked.values())}")
    assert run.rules() == expected, run.rules()
    assert sum(expected.values()) == sum(unpacked.values()) - 3 == 9  # 12 jobs unpacked
    assert {int(i) for i in re.findall(r"with SLURM jobid (\d+)", run.output)} == set(run.new_ids)
    assert all(job["JobState"] == "COMPLETED" for job in run.jobs.values())

    # the pack asked for one GPU, and its cells' train and evaluate ran in it, with that GPU
    job_id, job = packed_job(run)
    assert re.search(r"gpu:[^:,]+:1\b", job["TresPerJob"]), job["TresPerJob"]
    inside = [s for s in run.seen if s.job_id == str(job_id) and s.stage in ("train", "evaluate")]
    assert Counter(s.stage for s in inside) == Counter({"train": 2, "evaluate": 2}), run.seen
    assert all(s.cuda in {str(i) for i in range(slurm_cluster.n_fake_gpus)} for s in inside), inside
    log = Path(job["StdOut"]).read_text()
    starts = [m.start() for m in re.finditer(r"^localrule (train_cell|evaluate_cell):", log, re.M)]
    ends = [m.start() for m in re.finditer(r"^Finished jobid: \d+ \(Rule: (train_cell|evaluate_cell)\)", log, re.M)]
    # one after another: each job starts after the previous one finished
    assert len(starts) == 4 and all(end < start for end, start in zip(ends, starts[1:])), log[-3000:]

    assert_same_sources(packed.sources)
    assert_same_cells(packed.slurm_dir, packed.local_dir)
    for cell in (SMALL, BIG):
        assert_same_weights(cell_dir(packed.slurm_dir, cell), cell_dir(packed.local_dir, cell))


def test_cancelled_pack_resumes_its_interrupted_cell_from_its_checkpoint(packed: Sweeps, slurm_cluster, tiny_model,
                                                                       tiny_corpus) -> None:
    cluster = slurm_cluster
    # longer budgets (24000 and 96000 tokens, a checkpoint every 3000) retrain both cells
    config = tiny_config(tiny_model, tiny_corpus, **SWEEP, **{  # cells long enough to be cancelled: 16 epochs
        "train.tokens.base": 24000, "train.tokens.n_exponent": 1.0, "activations.max_epochs": 16})
    for folder in (packed.slurm_dir, packed.local_dir):
        write_config(folder / "config.yaml", config)
    cells = packed.slurm_dir / RUN / "cells" / SITE
    state: dict[str, str] = {}

    def cancel_between_cells(proc: subprocess.Popen, log_path: Path) -> None:
        """scancel the pack once one cell is trained and the other has a checkpoint."""
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "no trained cell beside a checkpoint\n" + log_path.read_text()[-4000:]
            trained = [p.parent.name for p in cells.glob("*/cfg.json") if p.stat().st_mtime > started]
            checkpointed = [p.parent.name for p in cells.glob("*/checkpoint.pt")]
            if trained and checkpointed:
                break
            time.sleep(0.05)
        running = [j for j in cluster.jobs() if rule_of(j) == GROUP and j["JobState"] == "RUNNING"]
        assert len(running) == 1, running
        cluster.cancel(running[0]["JobId"])
        state.update(trained=trained[0], resumed=checkpointed[0])

    sources = source_digests()
    started = time.time()
    local = local_snakemake(packed.local_dir, cluster)  # the uninterrupted reference
    try:
        first = slurm_snakemake(cluster, packed.slurm_dir, *PACK, during=cancel_between_cells)
        assert first.returncode != 0, "the cancelled pack did not fail the run"
        assert not (cells / state["trained"] / "sae.safetensors").exists()  # removed with the failed pack
        assert (cells / state["resumed"] / "checkpoint.pt").exists()
        # named targets: with the whole run as target, Snakemake would keep the earlier config's
        # cells.parquet (up to date by its own inputs' metadata) and rerun none of the cells
        targets = [f"{RUN}/cells/{SITE}/{cell}/metrics.json" for cell in (SMALL, BIG)] + [f"{RUN}/scaling/cells.parquet"]
        second = slurm_snakemake(cluster, packed.slurm_dir, *PACK, *targets)
    finally:
        finish_local(local, packed.local_dir)
    assert second.returncode == 0, second.output[-5000:]
    print(f"cancelled pack: trained {state['trained']}, resumed {state['resumed']}; rerun {dict(second.rules())}")

    # the rerun packed both cells again: the finished one trained from scratch, the
    # interrupted one from its checkpoint, mid-run
    stats = second.job_stats()
    assert stats == Counter({"train_cell": 2, "evaluate_cell": 2, "aggregate": 1}), stats
    assert second.rules() == Counter({GROUP: 1, "aggregate": 1}), second.rules()
    logs = packed.slurm_dir / RUN / "logs/train_cell" / SITE
    assert "resuming from" not in (logs / f"{state['trained']}.log").read_text()
    log = (logs / f"{state['resumed']}.log").read_text()
    match = re.search(r"resuming from (\S+) at (\d+) tokens", log)
    assert match and Path(match.group(1)).name == "checkpoint.pt" and int(match.group(2)) > 0, log[-3000:]
    assert not (cells / state["resumed"] / "checkpoint.pt").exists()

    # ... and both cells and the table equal the uninterrupted local run's
    assert_same_sources(sources)
    for cell in (SMALL, BIG):
        assert_same_weights(cell_dir(packed.slurm_dir, cell), cell_dir(packed.local_dir, cell))
        assert_same_train_log(cell_dir(packed.slurm_dir, cell), cell_dir(packed.local_dir, cell))
    assert_same_cells(packed.slurm_dir, packed.local_dir)
