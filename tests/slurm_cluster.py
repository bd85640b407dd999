"""A real single-node SLURM cluster on localhost, for tests.

Usage (context manager; the test file wraps it in a module-scoped fixture)::

    from slurm_cluster import LocalSlurmCluster

    with LocalSlurmCluster(tmp_path, n_fake_gpus=2) as cluster:
        subprocess.run(["sbatch", "--wrap", "true"], env=cluster.env)
        cluster.jobs()          # every job slurmctld still knows (MinJobAge=600)

Starting needs root and Debian's slurm/munge packages; they are installed
with apt-get when missing. When that is impossible the test is skipped
(``pytest.skip``) with the reason; a cluster that is installed but does not
come up is an error, with the daemon logs in the message.

Everything lives under ``root`` (a temporary folder): munge key and socket,
slurm.conf, gres.conf, state, spool, logs, fake GPU device nodes. The only
thing outside it is the symlink ``/etc/slurm/slurm.conf`` -> our slurm.conf,
which is needed because snakemake's slurm-jobstep plugin strips ``SLURM_CONF``
from the environment before its inner ``srun``. A real file there is never
touched (the test is skipped instead); the link is removed on ``stop()``.

Daemons run in the foreground as children of this process (``munged -F``,
``slurmctld -D``, ``slurmd -D``), so ``stop()`` knows their pids. Processes
they spawn (slurmstepd, job scripts) carry the environment variable
``SAESWEEP_LOCAL_SLURM=<root>``; ``stop()`` ends those by pid too.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable

import pytest

SLURM_ETC_CONF = Path("/etc/slurm/slurm.conf")
MARKER_VAR = "SAESWEEP_LOCAL_SLURM"
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The repository's SLURM profile, and what the local cluster needs on top of it:
# no account and the local partition (--default-resources replaces the
# profile's block), squeue for status (no slurmdbd, so no sacct), fast polling,
# no retries (a failed job must stay failed unless a test asks for retries),
# small default jobs.
PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "slurm"
LOCAL_OVERRIDES = [
    "--default-resources", "slurm_partition=debug", "mem_mb=200", "runtime=10",
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "1",
    "--latency-wait", "5",
    "--retries", "0",
    "--jobs", "4",
]

# terminal job states (a job in any other state may still hold resources)
FINISHED_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "REVOKED", "SPECIAL_EXIT",
}


class SlurmUnavailable(Exception):
    """SLURM cannot be provided on this machine (not root, no apt, ...)."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def _missing_binaries() -> list[str]:
    return [b for b in DAEMONS + CLIENTS if _which(b) is None]


def ensure_installed(timeout: float = 600) -> None:
    """Install Debian's slurm + munge when missing; raise SlurmUnavailable if impossible."""
    if not _missing_binaries():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"slurm/munge binaries missing ({', '.join(_missing_binaries())}) and not root")
    apt = _which("apt-get")
    if apt is None:
        raise SlurmUnavailable("slurm/munge binaries missing and no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SBIN_PATH)
    install = [apt, "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    log = []
    for attempt in ("install", "update+install"):
        if attempt == "update+install":
            r = subprocess.run([apt, "update", "-q"], env=env, capture_output=True, text=True, timeout=timeout)
            log.append(r.stdout[-1500:] + r.stderr[-1500:])
            if r.returncode != 0:
                break
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
        log.append(r.stdout[-1500:] + r.stderr[-1500:])
        if r.returncode == 0 and not _missing_binaries():
            return
    raise SlurmUnavailable(
        f"apt-get could not install {' '.join(APT_PACKAGES)}; still missing "
        f"{', '.join(_missing_binaries())}:\n" + "\n".join(log)[-3000:]
    )


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _available_memory_mb() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0]) // 1024
    return info.get("MemAvailable", info["MemFree"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' if gone): with the
    pid it identifies a process even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _kill_marked_processes(root: Path) -> None:
    """End the processes of the cluster in ``root``: slurmstepd and job
    processes outlive slurmd, and all carry ``SAESWEEP_LOCAL_SLURM=<root>``."""
    marker = f"{MARKER_VAR}={root}".encode()
    spare = _ancestors()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in spare:
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                found.append(int(entry.name))
        for pid in found:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if not found:
            return
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_pid_alive(p) for p in found):
            time.sleep(0.1)


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` for Popen: the child gets ``sig`` when the process that
    started it dies (even by SIGKILL), so nothing outlives its test session."""
    import ctypes

    def preexec() -> None:
        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except Exception:
            pass

    return preexec


def profile_gpu_model() -> str:
    """The profile's GPU model for train_cell (gres type of the fake GPUs, so that
    the profile's `--gpus=<model>:1` is satisfiable on the local cluster)."""
    import yaml

    conf = yaml.safe_load((PROFILE / "config.yaml").read_text())
    return str(conf.get("set-resources", {}).get("train_cell", {}).get("gpu_model", "fake"))


def _parse_scontrol_oneliner(line: str) -> dict[str, str]:
    """`scontrol -o show job` prints `Key=Value Key=Value ...` on one line."""
    fields = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][\w/:.]*)=(.*?)(?=\s[A-Za-z][\w/:.]*=|$)", line):
        fields[m.group(1)] = m.group(2).strip()
    return fields


class LocalSlurmCluster:
    """A slurmctld + slurmd + munged on 127.0.0.1, everything under ``root``.

    Parameters: ``root`` (a fresh temporary folder), ``n_fake_gpus`` (gres
    ``gpu:<gpu_type>:N`` backed by character devices), ``gpu_type``,
    ``cpus`` (defaults to the machine's; more is allowed, jobs then share
    cores), ``partition`` (the only partition, default ``debug``),
    ``start_timeout`` seconds.

    Attributes after ``start()``: ``env`` (environment for subprocesses:
    SLURM_CONF, the marker variable, inherited SLURM_* job variables removed),
    ``conf`` (Path to slurm.conf), ``partition``, ``startup_seconds``.
    """

    def __init__(
        self,
        root: os.PathLike | str,
        n_fake_gpus: int = 2,
        gpu_type: str = "fake",
        cpus: int | None = None,
        partition: str = "debug",
        start_timeout: float = 30.0,
    ):
        self.root = Path(root).resolve()
        self.n_fake_gpus = n_fake_gpus
        self.gpu_type = gpu_type
        self.cpus = cpus or os.cpu_count() or 1
        self.partition = partition
        self.start_timeout = start_timeout
        self.conf = self.root / "etc" / "slurm.conf"
        self.logdir = self.root / "log"
        self.env: dict[str, str] = {}
        self.startup_seconds: float | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._linked = False
        self._stopped = False

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> "LocalSlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LocalSlurmCluster":
        """Install if needed, write configs, start daemons, wait for an idle node.

        Calls ``pytest.skip`` when SLURM cannot be had here; raises RuntimeError
        (with daemon logs) when it is installed but does not come up.
        """
        try:
            self._preflight()
        except SlurmUnavailable as e:
            pytest.skip(f"no local SLURM cluster: {e}")
        t0 = time.monotonic()
        atexit.register(self.stop)
        try:
            self._write_files()
            self._link_etc_conf()
            self._start_daemons()
        except SlurmUnavailable as e:
            self.stop()
            pytest.skip(f"no local SLURM cluster: {e}")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("needs root (slurmd runs jobs as root, /etc/slurm/slurm.conf link)")
        ensure_installed()
        if SLURM_ETC_CONF.is_symlink():
            other = Path(os.readlink(SLURM_ETC_CONF)).parent.parent
            try:
                owner, started = (other / "run" / "owner.pid").read_text().split()[:2]
                owner = int(owner)
            except (OSError, ValueError):
                owner, started = 0, ""
            if owner and _start_time(owner) == started:
                raise SlurmUnavailable(
                    f"{SLURM_ETC_CONF} links to the local cluster in {other}, still in use by pid {owner}"
                )
            # left behind by a harness whose process died: end what it started, drop the link
            _kill_marked_processes(other)
            SLURM_ETC_CONF.unlink()
        elif SLURM_ETC_CONF.exists():
            raise SlurmUnavailable(f"{SLURM_ETC_CONF} is a real file (a configured SLURM?); refusing to replace it")

    def _write_files(self) -> None:
        r = self.root
        for d in ("etc", "munge", "run", "state", "spool", "log", "dev"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        (r / "run" / "owner.pid").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        ctld_port, slurmd_port = _free_ports(2)
        self.ports = {"slurmctld": ctld_port, "slurmd": slurmd_port}

        gres_lines = []
        if self.n_fake_gpus > 0:
            for i in range(self.n_fake_gpus):
                dev = r / "dev" / f"fakegpu{i}"
                if not dev.exists():
                    # gres File= entries must be character devices; (1, 3) is /dev/null
                    try:
                        os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
                    except PermissionError as e:
                        raise SlurmUnavailable(f"cannot create fake GPU device nodes (mknod: {e})") from e
            files = r / "dev" / (f"fakegpu[0-{self.n_fake_gpus - 1}]" if self.n_fake_gpus > 1 else "fakegpu0")
            gres_lines.append(f"NodeName=localhost Name=gpu Type={self.gpu_type} File={files}")
        (r / "etc" / "gres.conf").write_text("\n".join(gres_lines) + "\n")

        real_memory = max(512, int(_available_memory_mb() * 0.9))
        node_gres = f" Gres=gpu:{self.gpu_type}:{self.n_fake_gpus}" if self.n_fake_gpus > 0 else ""
        conf = f"""\
# written by tests/slurm_cluster.py; everything lives under {r}
ClusterName=saesweeplocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={real_memory}{node_gres} State=UNKNOWN
PartitionName={self.partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        self.conf.write_text(conf)

        env = {k: v for k, v in os.environ.items() if not (k.startswith("SLURM_") or k.startswith("SBATCH_") or k.startswith("SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env[MARKER_VAR] = str(r)
        if SBIN_PATH not in env.get("PATH", ""):
            env["PATH"] = env.get("PATH", "") + ":" + SBIN_PATH
        self.env = env

    def _link_etc_conf(self) -> None:
        SLURM_ETC_CONF.parent.mkdir(parents=True, exist_ok=True)
        if SLURM_ETC_CONF.is_symlink():  # stale link of a dead cluster (checked in _preflight)
            SLURM_ETC_CONF.unlink()
        os.symlink(self.conf, SLURM_ETC_CONF)
        self._linked = True

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        out = open(self.logdir / f"{name}.stdout", "wb")
        proc = subprocess.Popen(
            argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.root, preexec_fn=die_with_parent(signal.SIGTERM),
        )
        out.close()
        self._procs[name] = proc
        return proc

    def _run(self, *argv: str, timeout: float = 15, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def _wait(self, what: str, predicate, deadline: float) -> None:
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n{self.logs()}")
            if predicate():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}\n{self.logs()}")

    def _start_daemons(self) -> None:
        r = self.root
        deadline = time.monotonic() + self.start_timeout
        key = r / "munge" / "munge.key"
        if not key.exists():
            self._run(_which("mungekey"), "--create", f"--keyfile={key}", check=True)
        sock = r / "munge" / "munge.socket"
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
            f"--pid-file={r}/run/munged.pid", f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munge.seed",
        ])
        self._wait("munge socket", sock.exists, deadline)

        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld (scontrol ping)", lambda: "UP" in self._run("scontrol", "ping", timeout=5).stdout, deadline)

        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])

        def idle() -> bool:
            state = self._run("sinfo", "-h", "-N", "-o", "%t", timeout=5).stdout.strip()
            return state == "idle"

        self._wait("node idle (sinfo)", idle, deadline)

    # ---------------------------------------------------------------- queries
    def logs(self, tail: int = 40) -> str:
        """Last lines of every daemon log, for error messages."""
        parts = []
        for f in sorted(self.logdir.glob("*")):
            try:
                lines = f.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            parts.append(f"--- {f.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (finished ones stay MinJobAge=600 s),
        as dicts of `scontrol -o show job` fields: JobId, JobName, JobState,
        ExitCode, Comment, TresPerJob, ... Oldest first."""
        r = self._run("scontrol", "-o", "show", "job", timeout=10)
        if r.returncode != 0:
            if "No jobs in the system" in r.stdout + r.stderr:
                return []
            raise RuntimeError(f"scontrol show job failed: {r.stderr}")
        jobs = [_parse_scontrol_oneliner(line) for line in r.stdout.splitlines() if line.strip()]
        jobs = [j for j in jobs if "JobId" in j]
        return sorted(jobs, key=lambda j: int(j["JobId"]))

    def job(self, job_id: int | str) -> dict[str, str]:
        r = self._run("scontrol", "-o", "show", "job", str(job_id), timeout=10, check=True)
        return _parse_scontrol_oneliner(r.stdout.strip())

    def submitted_job_ids(self) -> list[int]:
        """Job ids slurmctld accepted from sbatch, read from its log (survives MinJobAge)."""
        text = (self.logdir / "slurmctld.log").read_text(errors="replace")
        return sorted({int(m) for m in re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", text)})

    def wait_for(self, job_id: int | str, states: Iterable[str], timeout: float = 60) -> dict[str, str]:
        """Poll until the job's JobState is one of ``states``; return the job's fields."""
        states = set(states)
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("JobState") in states:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {job.get('JobState')}, not in {states}")
            time.sleep(0.2)

    def cancel(self, job_id: int | str) -> None:
        self._run("scancel", str(job_id), timeout=10, check=True)

    # ------------------------------------------------------------------- stop
    def stop(self) -> None:
        """Cancel all jobs, stop every daemon by pid, end leftover job processes,
        remove the /etc/slurm/slurm.conf link. Idempotent; never raises."""
        if self._stopped:
            return
        self._stopped = True
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                self._run("scancel", "--user=root", timeout=10)
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    if all(j.get("JobState") in FINISHED_STATES for j in self.jobs()):
                        break
                    time.sleep(0.2)
            except Exception:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            except Exception:
                pass
        self._kill_marked_processes()
        if self._linked:
            try:
                if SLURM_ETC_CONF.is_symlink() and Path(os.readlink(SLURM_ETC_CONF)) == self.conf:
                    SLURM_ETC_CONF.unlink()
            except OSError:
                pass
            self._linked = False

    def _kill_marked_processes(self) -> None:
        if self.env:
            _kill_marked_processes(self.root)


def stop_snakemake(proc: "subprocess.Popen") -> None:
    """End a snakemake still running: SIGINT makes it scancel its jobs; kill after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
