"""The real workflow on a real SLURM cluster (single node, localhost, fake GPUs),
submitted through the repository's SLURM profile:

1. the tiny sweep (2 cells) runs with every job that is not a local rule sent
   through sbatch; `saesweep train` and `saesweep evaluate` run with the
   CUDA_VISIBLE_DEVICES that SLURM gave their job (read from the processes'
   own environment while they run); the results equal, bit for bit, those of a
   local `snakemake --cores 2` run of the same config;
2. forcing one cell's training again (its metrics.json and cells.parquet as
   targets) submits exactly that cell's train and evaluate jobs and the
   aggregate job after them;
3. a training job cancelled mid-run with scancel (SIGTERM, then SIGKILL after
   KillWait, as on preemption or a time limit) is resubmitted by Snakemake
   (`--retries 1`), resumes from the cell's checkpoint and ends with the same
   weights as an uninterrupted local run.

The tests share one cluster and one pair of sweep folders (SLURM and local)
and run in file order; tests 2 and 3 need only the sweep of the fixture.
Skipped with the reason when no local SLURM cluster can be had (see
slurm_cluster.py); the torch here runs on CPU (the config's train.device).
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_config, write_config
from slurm_cluster import LOCAL_OVERRIDES, MARKER_VAR, PROFILE, LocalSlurmCluster, die_with_parent, profile_gpu_model, stop_snakemake

pytestmark = pytest.mark.slurm

SITE = "resid2"
SMALL, BIG = "topk-n64-k4-s0", "topk-n256-k4-s0"  # the sweep's two cells; BIG is cancelled in test 3
RUN = "results/tiny"
# 2 cells; fits and figures of nmse only (delta_lm_loss of so tiny SAEs can be < 0 for
# every cell, and a log axis of only non-positive values breaks plot_figures)
# no feature browser: the pages are tested in tests/test_features.py
SWEEP = {"sweep.n_latents": [64, 256], "sweep.k": [4], "scaling.metrics": ["nmse"], "features.cells": []}
# rules whose jobs Snakemake runs itself: `all` (no command) and those with `localrule: True`
LOCAL_RULES = {"all", "cell_settings", "extraction_settings", "report_tables", "compare_architectures", "explorer"}
GPU_RULES = {"train_cell", "evaluate_cell"}
# columns of cells.parquet that may differ between two runs of the same config
VOLATILE_COLUMNS = {"eval_wall_time_s", "train_wall_time_s", "train_seconds", "train_tokens_per_s", "git_commit", "package_version",
                    "train_cpu_cores", "eval_cpu_cores"}  # a SLURM job's cores are those it was given


def rule_of(job: dict[str, str]) -> str:
    """The rule of a job from its SLURM comment (the plugin writes `rule_<rule>[_wildcards_<values>]`)."""
    return re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", job["Comment"]).group(1)


def cell_dir(workdir: Path, cell: str) -> Path:
    return workdir / RUN / "cells" / SITE / cell


def source_digests() -> dict[str, str]:
    """sha256 of the package's and the workflow's files: comparing results of two runs
    only means something if both ran the same code (others may edit the tree meanwhile)."""
    files = [*(REPO / "src" / "saesweep").rglob("*.py"), REPO / "Snakefile", *(REPO / "workflow").rglob("*.smk")]
    return {str(f.relative_to(REPO)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(files)}


def assert_same_sources(before: dict[str, str]) -> None:
    after = source_digests()
    changed = sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))
    if changed:
        pytest.fail(f"sources changed while the runs compared here ran, results are not comparable: {changed}")


# ------------------------------------------------------------------ processes
@dataclass(frozen=True)
class Seen:
    """A `saesweep <stage>` process of the cluster, as its environment had it."""

    stage: str
    settings: str  # the --settings argument ('' when none)
    job_id: str  # SLURM_JOB_ID ('' outside a SLURM job)
    cuda: str | None  # CUDA_VISIBLE_DEVICES (None when unset)


class ProcessWatcher(threading.Thread):
    """Samples /proc every 0.2 s and records every `saesweep <stage>` process that
    carries this cluster's marker variable, with SLURM_JOB_ID and
    CUDA_VISIBLE_DEVICES from its environment (what the process started with)."""

    def __init__(self, cluster_root: Path) -> None:
        super().__init__(daemon=True)
        self.marker = f"{MARKER_VAR}={cluster_root}".encode()
        self.seen: set[Seen] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(0.2)

    def sample(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if not any(a.endswith(b"/saesweep") or a == b"saesweep" for a in argv):
                    continue
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.marker not in environ:
                continue
            args = [a.decode(errors="replace") for a in argv]
            at = next(i for i, a in enumerate(args) if a.endswith("/saesweep") or a == "saesweep")
            stage = args[at + 1] if at + 1 < len(args) else ""
            settings = args[args.index("--settings") + 1] if "--settings" in args else ""
            env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
            self.seen.add(Seen(stage, settings, env.get("SLURM_JOB_ID", ""), env.get("CUDA_VISIBLE_DEVICES")))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


# ------------------------------------------------------------------- running
@dataclass
class SlurmRun:
    returncode: int
    output: str
    elapsed: float
    new_ids: list[int]  # job ids slurmctld accepted from sbatch during the run
    jobs: dict[int, dict[str, str]]  # their `scontrol show job` fields
    seen: set[Seen] = field(default_factory=set)

    def rules(self) -> Counter:
        return Counter(rule_of(job) for job in self.jobs.values())

    def cell_of(self, job_id: int) -> str:
        """The cell of a train/evaluate job, from the wildcards in its SLURM comment."""
        match = re.search(r"_wildcards_\w+_(topk-n\d+-k\d+-s\d+)$", self.jobs[job_id]["Comment"])
        return match.group(1) if match else ""

    def job_stats(self) -> Counter:
        """Snakemake's own 'Job stats' table of the run (the DAG's job count per rule)."""
        block = self.output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
        return Counter({m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", block, re.M)
                        if m.group(1) != "total"})


def clean_env(env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def local_snakemake(workdir: Path, cluster: LocalSlurmCluster, *args: str) -> subprocess.Popen:
    """The same workflow run locally (`--cores 2`, as tests/test_workflow.py does), in the
    background, with the SLURM jobs' two threads per cell job (the local profile's one thread
    would give other floating-point sums, hence other weights)."""
    env = clean_env({k: v for k, v in cluster.env.items() if k not in (MARKER_VAR, "SLURM_CONF")})
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--set-threads", "train_cell=2", "evaluate_cell=2",
               "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    log = open(workdir / "local-snakemake.log", "w")
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent(signal.SIGINT))
    log.close()
    return proc


def finish_local(proc: subprocess.Popen, workdir: Path, timeout: float = 600) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (workdir / "local-snakemake.log").read_text()
    assert rc == 0, f"local snakemake failed:\n{log[-4000:]}"


def slurm_command(workdir: Path, timeout_s: int, *args: str) -> list[str]:
    return [
        "timeout", "-s", "INT", "-k", "30", str(timeout_s),
        sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"),
        "--executor", "slurm", "--profile", str(PROFILE), "--workflow-profile", "none",
        *LOCAL_OVERRIDES, "--slurm-keep-successful-logs", *args,
    ]


def slurm_snakemake(cluster: LocalSlurmCluster, workdir: Path, *args: str, timeout_s: int = 480,
                    during=None) -> SlurmRun:
    """Run the workflow through sbatch (``args``: targets and options); ``during(proc, log_path)``
    runs while Snakemake does. Returns what slurmctld and Snakemake say about the run."""
    before = set(cluster.submitted_job_ids())
    watcher = ProcessWatcher(cluster.root)
    watcher.start()
    log_path = workdir / f"slurm-snakemake-{len(list(workdir.glob('slurm-snakemake-*.log')))}.log"
    command = slurm_command(workdir, timeout_s, *args)
    print("$", " ".join(command))
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=workdir, env=clean_env(cluster.env), stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent(signal.SIGINT))
        try:
            if during is not None:
                during(proc, log_path)
            rc = proc.wait(timeout=timeout_s + 40)
        finally:
            stop_snakemake(proc)
            watcher.stop()
    elapsed = time.monotonic() - t0
    output = log_path.read_text()
    print(f"snakemake (slurm) took {elapsed:.1f} s, rc {rc}")
    assert rc not in (124, 137), f"snakemake hit the timeout\n{output[-4000:]}"
    new_ids = sorted(set(cluster.submitted_job_ids()) - before)
    jobs = {int(j["JobId"]): j for j in cluster.jobs() if int(j["JobId"]) in new_ids}
    assert set(jobs) == set(new_ids), "slurmctld forgot jobs (MinJobAge)"
    return SlurmRun(rc, output, elapsed, new_ids, jobs, watcher.seen)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    # gres type = the profile's gpu_model, so that its `--gpus=<model>:1` is satisfiable;
    # 8 CPUs (jobs share the real cores) so that both cells' GPU jobs (4 CPUs each) run at once
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), n_fake_gpus=2, gpu_type=profile_gpu_model(), cpus=8)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Sweeps:
    slurm_dir: Path
    local_dir: Path
    run: SlurmRun
    sources: dict[str, str]  # digests before the runs


@pytest.fixture(scope="module")
def sweeps(slurm_cluster, tmp_path_factory, tiny_model, tiny_corpus) -> Sweeps:
    """The 2-cell tiny sweep through SLURM, and the same config run locally at the same time."""
    base = tmp_path_factory.mktemp("slurm-sweep")
    slurm_dir, local_dir = base / "slurm", base / "local"
    for folder in (slurm_dir, local_dir):
        folder.mkdir()
        write_config(folder / "config.yaml", tiny_config(tiny_model, tiny_corpus, **SWEEP))
    sources = source_digests()
    local = local_snakemake(local_dir, slurm_cluster)
    try:
        run = slurm_snakemake(slurm_cluster, slurm_dir)
    finally:
        finish_local(local, local_dir)
    assert run.returncode == 0, run.output[-5000:]
    return Sweeps(slurm_dir, local_dir, run, sources)


# ------------------------------------------------------------------ checks
def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), (a, name, (wa[name] - wb[name]).abs().max())


def assert_same_train_log(a: Path, b: Path) -> None:
    la, lb = (pd.read_parquet(f / "train_log.parquet").drop(columns=["tokens_per_s", "train_seconds"]) for f in (a, b))
    pd.testing.assert_frame_equal(la, lb, check_exact=True)


def assert_same_cells(a: Path, b: Path) -> None:
    ta, tb = (pd.read_parquet(w / RUN / "scaling/cells.parquet") for w in (a, b))
    columns = [c for c in ta.columns if c not in VOLATILE_COLUMNS]
    assert list(ta.columns) == list(tb.columns)
    pd.testing.assert_frame_equal(ta[columns], tb[columns], check_exact=True)


def local_rules_of(output: str) -> set[str]:
    """Rules whose jobs Snakemake announced as `localrule <name>:` (run on the submit host)."""
    return set(re.findall(r"^localrule (\w+):", output, re.M))


def assert_gpu_jobs_got_a_gpu(run: SlurmRun, cluster: LocalSlurmCluster) -> None:
    """Every train/evaluate job was seen running `saesweep train|evaluate` with the
    CUDA_VISIBLE_DEVICES of its SLURM job; CPU jobs' processes had none."""
    by_job: dict[str, set[Seen]] = {}
    for seen in run.seen:
        by_job.setdefault(seen.job_id, set()).add(seen)
    stage_of = {"train_cell": "train", "evaluate_cell": "evaluate"}
    for job_id, job in run.jobs.items():
        rule = rule_of(job)
        if rule in GPU_RULES:
            assert "gpu" in job.get("TresPerJob", ""), job  # sbatch --gpus=<model>:1 from the profile
            procs = [s for s in by_job.get(str(job_id), ()) if s.stage == stage_of[rule]]
            assert procs, f"no `saesweep {stage_of[rule]}` process seen for job {job_id}: {sorted(map(str, run.seen))}"
            for s in procs:
                assert s.cuda in {str(i) for i in range(cluster.n_fake_gpus)}, s
                assert run.cell_of(job_id) in s.settings, (s, job.get("StdOut"))
        else:
            assert "gpu" not in job.get("TresPerJob", ""), job
            for s in by_job.get(str(job_id), ()):
                assert s.cuda is None, s
    # nothing ran a GPU stage outside a SLURM job
    assert not [s for s in run.seen if s.stage in stage_of.values() and not s.job_id], run.seen


# --------------------------------------------------------------------- tests
def test_sweep_runs_through_sbatch_on_gpus_and_equals_a_local_run(sweeps: Sweeps, slurm_cluster) -> None:
    run, cluster = sweeps.run, slurm_cluster
    print(f"SLURM sweep: {run.elapsed:.1f} s, {len(run.new_ids)} sbatch jobs: {dict(run.rules())}")

    # every job of the DAG but the local rules' went through sbatch, once
    stats = run.job_stats()
    assert stats["train_cell"] == stats["evaluate_cell"] == 2, stats
    assert local_rules_of(run.output) == LOCAL_RULES
    expected = Counter({rule: n for rule, n in stats.items() if rule not in LOCAL_RULES})
    assert run.rules() == expected, (run.rules(), stats)
    assert sum(expected.values()) == 12  # prepare_corpus, 2 extract parts, 2 manifests, 2 train, 2 evaluate, 3 aggregation
    # the ids Snakemake got back from sbatch = the ids slurmctld logged as submitted
    assert {int(i) for i in re.findall(r"with SLURM jobid (\d+)", run.output)} == set(run.new_ids)
    for job in run.jobs.values():
        assert job["JobState"] == "COMPLETED", job
        assert job["JobName"].startswith("saesweep_") and job["Partition"] == "debug", job
    assert {run.cell_of(i) for i, j in run.jobs.items() if rule_of(j) == "train_cell"} == {SMALL, BIG}

    assert_gpu_jobs_got_a_gpu(run, cluster)

    # the same results as the local run: metrics, training logs and weights, bit for bit
    # (same code, same data, same torch thread count: both train with --threads 2)
    assert_same_sources(sweeps.sources)
    local_log = (sweeps.local_dir / "local-snakemake.log").read_text()
    slurm_logs = "".join(Path(j["StdOut"]).read_text() for j in run.jobs.values() if rule_of(j) == "train_cell")
    assert set(re.findall(r"saesweep train .* --threads (\d+)", slurm_logs)) == {"2"}
    assert set(re.findall(r"saesweep train .* --threads (\d+)", local_log)) == {"2"}
    assert_same_cells(sweeps.slurm_dir, sweeps.local_dir)
    for cell in (SMALL, BIG):
        assert_same_weights(cell_dir(sweeps.slurm_dir, cell), cell_dir(sweeps.local_dir, cell))
        assert_same_train_log(cell_dir(sweeps.slurm_dir, cell), cell_dir(sweeps.local_dir, cell))
        assert not (cell_dir(sweeps.slurm_dir, cell) / "checkpoint.pt").exists()


def test_forcing_one_cell_submits_its_jobs_and_the_aggregation_only(sweeps: Sweeps, slurm_cluster) -> None:
    other = cell_dir(sweeps.slurm_dir, BIG)
    untouched = {p: p.stat().st_mtime_ns for p in [*other.iterdir(), *(sweeps.slurm_dir / RUN / "activations").rglob("*")]}
    weights_before = load_file(str(cell_dir(sweeps.slurm_dir, SMALL) / "sae.safetensors"))
    forced = f"{RUN}/cells/{SITE}/{SMALL}/sae.safetensors"
    targets = [f"{RUN}/cells/{SITE}/{SMALL}/metrics.json", f"{RUN}/scaling/cells.parquet"]
    # targets first: --forcerun takes any number of values
    run = slurm_snakemake(slurm_cluster, sweeps.slurm_dir, *targets, "--forcerun", forced)
    print(f"forced {SMALL}: {run.elapsed:.1f} s, {len(run.new_ids)} sbatch jobs: {dict(run.rules())}")
    assert run.returncode == 0, run.output[-5000:]

    expected = Counter({"train_cell": 1, "evaluate_cell": 1, "aggregate": 1})
    assert run.job_stats() == expected, run.job_stats()
    assert run.rules() == expected, run.rules()
    assert {int(i) for i in re.findall(r"with SLURM jobid (\d+)", run.output)} == set(run.new_ids)
    assert {run.cell_of(i) for i, j in run.jobs.items() if rule_of(j) in GPU_RULES} == {SMALL}
    assert all(j["JobState"] == "COMPLETED" for j in run.jobs.values())
    assert_gpu_jobs_got_a_gpu(run, slurm_cluster)
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # the other cell and the activations stayed
    # retraining reproduces the weights, and the table still equals the local run's
    assert_same_sources(sweeps.sources)
    weights_after = load_file(str(cell_dir(sweeps.slurm_dir, SMALL) / "sae.safetensors"))
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)
    assert_same_cells(sweeps.slurm_dir, sweeps.local_dir)


def test_cancelled_training_job_resumes_from_its_checkpoint(sweeps: Sweeps, slurm_cluster, tiny_model, tiny_corpus) -> None:
    cluster = slurm_cluster
    # only BIG's budget grows (n_exponent: n64 = n_ref keeps 12000 tokens): 12000 · 4^1.5 = 96000
    # tokens, seconds of training with a checkpoint every 3000 tokens
    config = tiny_config(tiny_model, tiny_corpus, **SWEEP, **{  # a cell long enough to be cancelled: 16 epochs
        "train.tokens.n_exponent": 1.5, "activations.max_epochs": 16})
    budget = 96_000
    for folder in (sweeps.slurm_dir, sweeps.local_dir):
        write_config(folder / "config.yaml", config)
    target = f"{RUN}/cells/{SITE}/{BIG}/sae.safetensors"
    cell = cell_dir(sweeps.slurm_dir, BIG)
    cancelled: list[str] = []

    def cancel_once_checkpointed(proc: subprocess.Popen, log_path: Path) -> None:
        deadline = time.monotonic() + 120
        while not (cell / "checkpoint.pt").exists():
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint.pt\n" + log_path.read_text()[-4000:]
            time.sleep(0.05)
        running = [j for j in cluster.jobs() if rule_of(j) == "train_cell" and j["JobState"] == "RUNNING"]
        assert len(running) == 1, running
        cluster.cancel(running[0]["JobId"])  # SIGTERM to the job's processes, SIGKILL after KillWait
        cancelled.append(running[0]["JobId"])

    sources = source_digests()
    local = local_snakemake(sweeps.local_dir, cluster, target)  # the uninterrupted reference
    try:
        run = slurm_snakemake(cluster, sweeps.slurm_dir, "--retries", "1", target, during=cancel_once_checkpointed)
    finally:
        finish_local(local, sweeps.local_dir)
    print(f"cancel + resume: {run.elapsed:.1f} s, {len(run.new_ids)} sbatch jobs: {dict(run.rules())}")
    assert run.returncode == 0, run.output[-5000:]

    # the cancelled job failed, Snakemake resubmitted it, the second one completed
    first = cancelled[0]
    assert re.search(rf"SLURM-job '{first}' failed, SLURM status is: 'CANCELLED'", run.output), run.output[-4000:]
    assert run.rules() == Counter({"train_cell": 2}), run.rules()
    first_id, second_id = run.new_ids
    assert str(first_id) == first
    assert run.jobs[first_id]["JobState"] == "CANCELLED" and run.jobs[second_id]["JobState"] == "COMPLETED"
    assert run.cell_of(first_id) == run.cell_of(second_id) == BIG
    assert_gpu_jobs_got_a_gpu(run, cluster)

    # the second job resumed from the first one's checkpoint, mid-run
    log = (sweeps.slurm_dir / RUN / "logs/train_cell" / SITE / f"{BIG}.log").read_text()
    match = re.search(r"resuming from (\S+) at (\d+) tokens", log)
    assert match, log[-3000:]
    assert Path(match.group(1)).name == "checkpoint.pt" and 0 < int(match.group(2)) < budget, match.group(0)
    print(match.group(0))
    assert not (cell / "checkpoint.pt").exists()

    # ... and ended where the uninterrupted local run ended
    assert_same_sources(sources)
    reference = cell_dir(sweeps.local_dir, BIG)
    assert "resuming from" not in (sweeps.local_dir / RUN / "logs/train_cell" / SITE / f"{BIG}.log").read_text()
    for folder in (cell, reference):
        assert json.loads((folder / "cfg.json").read_text())["training"]["tokens"] == budget
    assert_same_weights(cell, reference)
    assert_same_train_log(cell, reference)
