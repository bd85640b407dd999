"""The local SLURM harness runs a throwaway workflow through the repository's
SLURM profile: every job goes through sbatch, the GPU rule gets a (fake) GPU
from SLURM, and a job killed with scancel is reported failed by Snakemake."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slurm_cluster import LOCAL_OVERRIDES, PROFILE, LocalSlurmCluster, die_with_parent, profile_gpu_model, stop_snakemake

pytestmark = pytest.mark.slurm

SNAKEFILE = textwrap.dedent(
    """
    localrules: all

    rule all:
        input: "agg.txt", "sleeper.txt"

    # CPU job; train_cell gets gpu=1 (and gpu_model) from the profile's set-resources
    rule prepare_corpus:
        output: "corpus.txt"
        shell: 'echo "cuda=${{CUDA_VISIBLE_DEVICES:-unset}} job=$SLURM_JOB_ID" > {output}'

    rule train_cell:
        output: "gpu.txt"
        shell: 'echo "cuda=${{CUDA_VISIBLE_DEVICES:-unset}} job=$SLURM_JOB_ID" > {output}'

    rule aggregate:
        input: "corpus.txt", "gpu.txt"
        output: "agg.txt"
        shell: 'cat {input} > {output}; echo "cuda=${{CUDA_VISIBLE_DEVICES:-unset}} job=$SLURM_JOB_ID" >> {output}'

    # cancelled by the test while it sleeps
    rule sleeper:
        output: "sleeper.txt"
        shell: 'echo $SLURM_JOB_ID > sleeper.started; sleep 300; touch {output}'
    """
)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    # the fake GPUs carry the profile's gpu_model as gres type, so that
    # `--gpus=<model>:1` from the profile is satisfiable here
    cluster = LocalSlurmCluster(
        tmp_path_factory.mktemp("slurm"), n_fake_gpus=2, gpu_type=profile_gpu_model(), cpus=4
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def snakemake_command(workdir: Path, timeout_s: int) -> list[str]:
    return [
        "timeout", "-s", "INT", "-k", "30", str(timeout_s),
        sys.executable, "-m", "snakemake",
        "--snakefile", str(workdir / "Snakefile"), "--directory", str(workdir),
        "--executor", "slurm", "--profile", str(PROFILE), "--workflow-profile", "none",
        *LOCAL_OVERRIDES,
        "--keep-going",
    ]


def read_fields(path: Path) -> dict[str, str]:
    last = path.read_text().strip().splitlines()[-1]
    return dict(item.split("=", 1) for item in last.split())


def test_workflow_through_sbatch_with_gpu_and_cancel(slurm_cluster, tmp_path):
    cluster = slurm_cluster
    assert cluster.startup_seconds < 15
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    env = dict(cluster.env)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    log_path = tmp_path / "snakemake.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            snakemake_command(tmp_path, timeout_s=100), cwd=tmp_path, env=env,
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(signal.SIGINT),
        )
        try:
            # kill the sleeper mid-run, once its shell command has started
            started = tmp_path / "sleeper.started"
            deadline = time.monotonic() + 60
            while not (started.exists() and started.read_text().strip()):
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "sleeper never started\n" + log_path.read_text()
                time.sleep(0.2)
            sleeper_id = started.read_text().strip()
            assert cluster.job(sleeper_id)["JobState"] == "RUNNING"
            cluster.cancel(sleeper_id)
            rc = proc.wait(timeout=110)
        finally:
            stop_snakemake(proc)
    elapsed = time.monotonic() - t0
    out = log_path.read_text()
    print(out[-4000:])
    print(f"snakemake took {elapsed:.1f} s")

    # the cancelled job made the run fail, and Snakemake said why
    assert rc not in (124, 137), f"snakemake hit the timeout\n{out[-3000:]}"
    assert rc != 0
    assert re.search(rf"SLURM-job '{sleeper_id}' failed, SLURM status is: 'CANCELLED'", out), out[-3000:]
    assert cluster.job(sleeper_id)["JobState"] == "CANCELLED"
    assert not (tmp_path / "sleeper.txt").exists()

    # every job went through sbatch: ids in the outputs = ids Snakemake got back
    # from sbatch = this run's jobs in the cluster; each ran its own rule
    fields = {rule: read_fields(tmp_path / f) for rule, f in
              [("prepare_corpus", "corpus.txt"), ("train_cell", "gpu.txt"), ("aggregate", "agg.txt")]}
    ran_ids = {rule: f["job"] for rule, f in fields.items()} | {"sleeper": sleeper_id}
    submitted = set(re.findall(r"SLURM jobid (\d+)", out))
    assert submitted == set(ran_ids.values()), (submitted, ran_ids)
    jobs = {j["JobId"]: j for j in cluster.jobs()}
    for rule, job_id in ran_ids.items():
        job = jobs[job_id]
        assert job["JobName"].startswith("saesweep_"), job  # profile's jobname prefix
        assert job["Comment"] == f"rule_{rule}", job
        assert job["Partition"] == "debug"
        assert int(job_id) in cluster.submitted_job_ids()
        if rule != "sleeper":
            assert job["JobState"] == "COMPLETED", job

    # the GPU rule got a GPU from SLURM, the CPU rules did not
    assert fields["train_cell"]["cuda"] in {"0", "1"}, fields
    assert "gpu" in jobs[ran_ids["train_cell"]].get("TresPerJob", ""), jobs[ran_ids["train_cell"]]
    assert fields["prepare_corpus"]["cuda"] == "unset"
    assert fields["aggregate"]["cuda"] == "unset"

    # nothing left behind in the queue
    assert not [j for j in cluster.jobs() if j["JobState"] in {"RUNNING", "PENDING", "COMPLETING"}]
