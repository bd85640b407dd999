"""Training one cell of any architecture: the loop of Gao et al. (2024) with checkpoints
and resume.

Per step: the architecture's loss and gradients (``SparseAutoencoder.training_step``), its
pre-step hook (decoder-gradient projection where decoder rows are unit norm), Adam at the
learning rate of ``train.schedule``, its post-step hook (decoder renormalisation), dead-latent
counters. A latent is dead when it has not fired (value > threshold) in the last ``window`` tokens
(``dead_fraction`` in the log; AuxK acts on these latents).

Every batch is whole (``data.loader``). At the held-out points of ``train.schedule`` the
normalised MSE on the first ``heldout.tokens`` held-out activations (as the evaluation
defines it), the L0 and the fraction of latents that never fire on those tokens are logged
(``heldout_measures``).

With ``train.budget`` converge, T is a cap, the curve has W points per doubling and the run
ends at the first point where the held-out loss has converged (``train.convergence``).

Compute and time: every log row carries ``flops``, the cumulative FLOPs of the steps so far
(``sae.flops``: each architecture's step as it runs), and ``train_seconds``, the wall-clock
of training alone: the steps and the loading of their batches, without the held-out
evaluations and the checkpoint writes.

Checkpoints (weights, Adam state, counters, tokens seen, log, RNG state) are written
atomically every ``checkpoint_every_tokens`` and on SIGTERM; a rerun resumes from the
last one and, on CPU, ends with the same weights as an uninterrupted run.

A cell with ``distributed`` settings (D data-parallel replicas × S latent shards) runs the
same loop in each of its D·S processes; ``train.distributed`` holds the process groups,
the layout, the sharded checkpoints and the launcher, and the loop calls it only where
the processes must agree (a step's collectives, the log's dead fraction, the held-out
curve and the outputs, gathered to rank 0).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import pandas as pd
import torch

from saesweep.data.activations import ActivationStore
from saesweep.core.devices import resolve_device
from saesweep.core.job_settings import TrainSettings, to_json
from saesweep.core.errors import Interrupted, UserError
from saesweep.sae.base import SparseAutoencoder
from saesweep.sae.export import save_sae
from saesweep.core.files import atomic_path
from saesweep.data.loader import BatchStream
from saesweep.sae.flops import step_flops
from saesweep.evaluation.metrics import ReconstructionAccumulator
from saesweep.core.progress import Progress
from saesweep.core.provenance import provenance
from saesweep.sae.base import StepContext, StepOutput
from saesweep.sae.registry import build_sae
from saesweep.train import convergence
from saesweep.train.checkpoints import CHECKPOINT, fits, read_checkpoint
from saesweep.train.ema import evaluated_weights, weight_average
from saesweep.core.normalisation import normalisation_record
from saesweep.train.distributed import Layout, ProcessGroups
from saesweep.train.schedule import heldout_points, lr_at


T = TypeVar("T")

# Where a training job's device setting comes from, for the message when it cannot be had.
DEVICE_KEY = "config key train.device"
# Initialisation runs here whatever the training device, so every device starts alike.
CPU = torch.device("cpu")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def make_adam(parameters: Any, lr: float, eps: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam with torch's fused kernel (one pass per tensor) where the device and dtype have
    one, else its default implementation: the same update either way."""
    parameters = list(parameters)
    try:
        return torch.optim.Adam(parameters, lr=lr, eps=eps, betas=betas, fused=True)
    except RuntimeError:
        return torch.optim.Adam(parameters, lr=lr, eps=eps, betas=betas)


class Trainer:
    """The state of one cell's training, from scratch or from its checkpoint; with
    ``groups``, one rank's part of a distributed cell (its latents, its rows of each batch)."""

    def __init__(self, settings: TrainSettings, folder: Path, groups: ProcessGroups | None = None) -> None:
        self.settings, self.folder, self.groups = settings, Path(folder), groups
        self.device = groups.device if groups else resolve_device(settings.device, DEVICE_KEY)
        self.store = ActivationStore(settings.activations)
        n = settings.n_latents
        self.sae = build_sae(settings.arch, self.store.d, n, settings.params)
        self.sae.input_normalisation = settings.input_normalisation
        if groups:
            groups.shard_module(self.sae)
        self.sae = self.sae.to(self.device)
        self.optimizer = make_adam(self.sae.parameters(), settings.lr, settings.adam_eps, self.sae.adam_betas)
        self.ema = weight_average(self.sae, settings.ema_decay)
        n_held = groups.n_local if groups else n
        self.tokens_since_fired = torch.zeros(n_held, dtype=torch.long, device=self.device)
        self.tokens_seen = 0
        self.steps = 0
        self.log_rows: list[dict[str, float]] = []
        self.elapsed = 0.0
        self.flops = torch.zeros((), dtype=torch.long, device=self.device)
        self.untimed_seconds = 0.0
        self.hash = provenance(to_json(settings))["settings_hash"]
        heldout = settings.heldout
        self.curve = bool(heldout.points)
        self.heldout = ActivationStore(heldout.activations).head(heldout.tokens, self.device) if self.curve and self.leader else None
        if not self.resume():
            self.initialise()

    def initialise(self) -> None:
        """Seeded init (the architecture's ``initialise``, on the CPU so every device starts
        from the same weights) from a sample of the training activations."""
        torch.manual_seed(self.settings.seed)
        sample_size = min(self.settings.geometric_median_sample, self.store.tokens)
        sample = next(iter(BatchStream(
            self.store, sample_size, self.settings.seed + 1, sample_size, device=CPU,
            normalisation=self.settings.input_normalisation,
        )))
        generator = torch.Generator().manual_seed(self.settings.seed)
        with torch.no_grad():
            self.sae.set_normalisation(self.store.mean.to(self.device), self.store.scale)
            cpu = build_sae(self.settings.arch, self.store.d, self.sae.n, self.settings.params)
            cpu.initialise(sample, generator)
            for name, parameter in cpu.named_parameters():
                block = self.groups.local_block(cpu, name, parameter) if self.groups else parameter
                self.sae.get_parameter(name).copy_(block)

    @property
    def leader(self) -> bool:
        """Whether this process writes the outputs and the log (rank 0, or the only one)."""
        return self.groups is None or self.groups.layout.rank == 0

    def shard_state(self) -> dict[str, Any]:
        """What each latent shard checkpoints: its weights, Adam state and counters."""
        return {
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired,
            **({"ema": self.ema.state_dict()} if self.ema else {}),
        }

    def shared_state(self) -> dict[str, Any]:
        """What the whole cell checkpoints once."""
        return {
            "settings_hash": self.hash,
            "tokens_seen": self.tokens_seen,
            "steps": self.steps,
            "log_rows": self.log_rows,
            "elapsed": self.elapsed,
            "rng": torch.get_rng_state(),
            "flops": int(self.flops),
            "untimed_seconds": self.untimed_seconds,
        }

    def checkpoint_state(self) -> dict[str, Any]:
        return {**self.shared_state(), **self.shard_state()}

    def save_checkpoint(self) -> None:
        if self.groups:
            self.groups.save_checkpoint(self.folder, self.tokens_seen, self.shard_state(), self.shared_state())
            return
        with atomic_path(self.folder / CHECKPOINT) as temporary:
            torch.save(self.checkpoint_state(), temporary)

    def resume(self) -> bool:
        """Load the checkpoint if it exists, was made from the same settings (and, when
        distributed, the same layout) and holds an SAE of this cell's shapes; one that cannot
        be read is a UserError naming it (``train.checkpoints``)."""
        path = self.folder / CHECKPOINT
        if self.groups:
            found = self.groups.load_checkpoint(self.folder, self.hash, self.sae)
            if found is None:
                return False
            state = {**found[0], **found[1]}
        else:
            if not path.exists():
                return False
            # on the CPU: the RNG state must stay there (set_rng_state refuses a CUDA tensor);
            # load_state_dict copies the rest onto the SAE's device
            state = read_checkpoint(path, CPU, ("settings_hash", "sae", "flops"))
            if state["settings_hash"] != self.hash:
                print(f"ignoring checkpoint {path}: made from other settings", file=sys.stderr)
                return False
            if not fits(path, state["sae"], self.sae):
                return False
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.tokens_seen, self.steps = state["tokens_seen"], state["steps"]
        self.log_rows, self.elapsed = state["log_rows"], state["elapsed"]
        torch.set_rng_state(state["rng"])
        self.flops.fill_(state["flops"])
        self.untimed_seconds = state["untimed_seconds"]
        print(f"resuming from {path} at {self.tokens_seen} tokens", file=sys.stderr)
        return True

    def dead_mask(self) -> torch.Tensor:
        """Latents that have not fired within the dead window."""
        return self.tokens_since_fired >= self.settings.dead.window_tokens

    def dead_fraction(self) -> float:
        """The share of the cell's latents that are dead (over every shard)."""
        if self.groups is None:
            return self.dead_mask().float().mean().item()
        return self.groups.shard_count(int(self.dead_mask().sum())) / self.settings.n_latents

    def whole_sae(self) -> SparseAutoencoder | None:
        """The SAE being trained, whole: gathered to rank 0 when sharded (None elsewhere)."""
        if self.groups is None:
            return self.sae
        if self.groups.shards == 1:
            return self.sae if self.leader else None
        return self.groups.gather_module(self.sae, self.settings.arch, self.settings.params)

    @torch.no_grad()
    def heldout_measures(self) -> dict[str, float | None]:
        """The current SAE on the held-out sample of H tokens, as the evaluation defines each:
        ``heldout_nmse``; ``heldout_dead_fraction``, the latents that never fire on it; and the
        firings a latent at the uniform rate L0 / n would have (L0 measured on the sample) in
        the sample, ``heldout_expected_firings`` = H · L0 / n, and in the training dead window
        W, ``window_expected_firings`` = W · L0 / n: a latent silent for far fewer expected
        firings than these may be rare, not dead. Distributed: on the SAE gathered to rank 0;
        nothing on the other ranks (they do not write the log)."""
        sae = self.whole_sae()
        if sae is None:
            return {}
        sae = sae.to(self.device)
        accumulator = ReconstructionAccumulator(sae.n, self.settings.dead.threshold)
        for start in range(0, len(self.heldout), 4096):
            x = sae.normalise(self.heldout[start : start + 4096])
            codes = sae.encode(x)
            accumulator.update(x, sae.decode(codes), codes.col_indices(), codes.values())
        result = accumulator.result()
        rate = result["l0"] / sae.n
        return {
            "heldout_nmse": result["normalised_mse"],
            "heldout_l0": result["l0"],
            "heldout_dead_fraction": result["dead_fraction"],
            "heldout_expected_firings": len(self.heldout) * rate,
            "window_expected_firings": self.settings.dead.window_tokens * rate,
        }

    def converged(self) -> bool:
        """Whether the held-out curve so far meets ``train.budget``'s criterion
        (``train.convergence``); distributed: rank 0's decision (it alone measures the curve), shared."""
        done = convergence.converged(*convergence.curve(self.log_rows), self.settings.convergence)
        return self.groups.any_true(done) if self.groups else done

    def step(self, x: torch.Tensor) -> dict[str, float]:
        """One optimisation step on batch x (this replica's rows of the global batch when
        distributed); returns the step's loss parts."""
        settings = self.settings
        lr = lr_at(settings, self.tokens_seen)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        k_aux, aux_coef, aux_normaliser = self.sae.auxk_settings()
        context = StepContext(
            dead_mask=self.dead_mask() if aux_coef > 0 else None,
            k_aux=k_aux,
            aux_coef=aux_coef,
            progress=self.tokens_seen / settings.tokens,
            fire_threshold=settings.dead.threshold,
            aux_normaliser=aux_normaliser,
            collectives=self.groups,
        )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=settings.autocast_bf16):
            out = self.sae.training_step(x, context)
        if not torch.isfinite(out.loss):
            raise TrainingDiverged(
                f"cell {self.folder}: the loss became {out.loss.item()} at {self.tokens_seen} tokens; "
                "lower train.lr.base or check the activations"
            )
        if self.groups:
            self.groups.sum_gradients(self.sae)
        self.sae.before_optimizer_step()
        self.optimizer.step()
        self.sae.after_optimizer_step()
        if self.ema:
            self.ema.update()
        batch_tokens = self.groups.data_count(len(x)) if self.groups else len(x)
        self.tokens_since_fired += batch_tokens
        if self.groups:
            fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
            fired[out.fired] = True
            self.tokens_since_fired[self.groups.any_replica(fired)] = 0
        else:
            self.tokens_since_fired[out.fired] = 0
        self.tokens_seen += batch_tokens
        self.steps += 1
        self.count_flops(batch_tokens, out, context)
        parts = {("nmse" if name == "mse" else name): value.item() for name, value in out.parts.items()}
        return {"loss": out.loss.item(), **parts, "lr": lr}

    def count_flops(self, batch_tokens: int, out: StepOutput, context: StepContext) -> None:
        """Add the step's FLOPs (``sae.flops``) with its support and AuxK's k_a = min(k_aux,
        dead latents), counted on the device (no host synchronisation); distributed: the
        support summed over every process, the dead latents over the shards."""
        dead, entries = None if context.dead_mask is None else context.dead_mask.sum(), out.entries
        if self.groups:
            dead = None if dead is None else self.groups.shard_sum(dead)
            if entries is not None:
                entries = self.groups.data_sum(self.groups.shard_sum(torch.tensor(entries, device=self.device)))
        aux = 0 if dead is None else dead.clamp(max=context.k_aux)
        settings = self.settings
        self.flops += step_flops(settings.arch, batch_tokens, self.store.d, settings.n_latents, self.sae.params,
                                 entries, aux)

    def untimed(self, work: Callable[[], T]) -> T:
        """``work()`` (a held-out evaluation, a checkpoint write), its wall-clock kept out of
        ``train_seconds``."""
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.untimed_seconds += time.perf_counter() - started

    def run(self) -> None:
        """Train to the budget, logging and checkpointing; then write the outputs."""
        settings = self.settings
        stream = BatchStream(
            self.store, settings.batch_size, settings.seed, settings.tokens,
            start=self.tokens_seen, device=self.device, on_exhausted=settings.on_exhausted,
            normalisation=settings.input_normalisation,
        )
        progress = Progress(f"train {self.folder.name}", settings.tokens, done=self.tokens_seen)
        next_log = (self.tokens_seen // settings.log_every_tokens + 1) * settings.log_every_tokens
        next_checkpoint = self.tokens_seen + settings.checkpoint_every_tokens
        pending = [t for t in heldout_points(settings) if t > self.tokens_seen] if self.curve else []
        terminated: list[int] = []
        previous = signal.signal(signal.SIGTERM, lambda signum, _frame: terminated.append(signum))
        started = time.perf_counter() - self.elapsed
        window_tokens, window_start = 0, time.perf_counter()
        try:
            for batch in stream:
                x = self.groups.layout.data_slice(batch) if self.groups else batch
                parts = self.step(x)
                window_tokens += len(batch)
                self.elapsed = time.perf_counter() - started
                heldout_due = bool(pending) and self.tokens_seen >= pending[0]
                if heldout_due or self.tokens_seen >= next_log or self.tokens_seen >= stream.end:
                    row = {
                        "tokens": self.tokens_seen, "step": self.steps, **parts,
                        "dead_fraction": self.dead_fraction(),
                        "tokens_per_s": window_tokens / max(time.perf_counter() - window_start, 1e-9),
                        "flops": int(self.flops), "train_seconds": self.elapsed - self.untimed_seconds,
                    }
                    if heldout_due:
                        with evaluated_weights(self.ema):
                            row |= self.untimed(self.heldout_measures)
                        pending = [t for t in pending if t > self.tokens_seen]
                    self.log_rows.append(row)
                    window_tokens, window_start = 0, time.perf_counter()
                    if self.tokens_seen >= next_log:
                        next_log += settings.log_every_tokens
                    # train.budget converge: end at the first held-out point meeting the criterion
                    if heldout_due and settings.convergence and self.converged():
                        break
                if self.leader:
                    progress.update(self.tokens_seen)
                if self.tokens_seen >= next_checkpoint:
                    self.untimed(self.save_checkpoint)
                    next_checkpoint += settings.checkpoint_every_tokens
                if self.groups.any_true(bool(terminated)) if self.groups else terminated:
                    self.save_checkpoint()
                    raise Interrupted(f"SIGTERM at {self.tokens_seen} tokens; checkpoint written")
        finally:
            signal.signal(signal.SIGTERM, previous)
        if self.leader:
            progress.finish()
        self.write_outputs()

    def write_outputs(self) -> None:
        """``train_log.parquet``, then ``sae.safetensors`` and ``cfg.json``; the checkpoint
        goes. Distributed: rank 0 writes the SAE gathered from the shards, as one SAE."""
        settings = self.settings
        dead_fraction = self.dead_fraction()
        if self.ema:
            self.ema.install()  # the exported weights are the average (train.ema)
        sae = self.whole_sae()
        if sae is None:
            return
        log = pd.DataFrame(self.log_rows)
        with atomic_path(self.folder / "train_log.parquet") as temporary:
            log.to_parquet(temporary, index=False)
        cfg = {
            "arch": settings.arch,
            "params": settings.params,
            "d": self.store.d,
            "n_latents": settings.n_latents,
            "seed": settings.seed,
            "site": settings.site,
            "model": self.store.manifest["model"],
            "revision": self.store.manifest["revision"],
            "corpus_fingerprint": self.store.manifest["corpus_fingerprint"],
            "normalisation": normalisation_record(
                settings.input_normalisation, self.store.manifest["mean_squared_norm"], self.store.scale,
            ),
            "training": {
                "tokens": self.tokens_seen,
                "steps": self.steps,
                "wall_time_s": self.elapsed,
                "train_seconds": self.elapsed - self.untimed_seconds,
                "flops": int(self.flops),
                "tokens_per_s": self.tokens_seen / max(self.elapsed, 1e-9),
                "final_dead_fraction": dead_fraction,
                "final_nmse": log["nmse"].iloc[-1] if len(log) else float("nan"),
                "epochs": self.tokens_seen / self.store.tokens,
                **convergence.outcome(self.log_rows, settings.convergence, settings.tokens),
                "ema_decay": settings.ema_decay,
            },
            "settings": to_json(settings),
            "provenance": provenance(to_json(settings), self.device, Layout.of(settings.distributed).world),
        }
        save_sae(sae, self.folder, cfg)
        if self.groups:
            self.groups.remove_checkpoint(self.folder)
        else:
            (self.folder / CHECKPOINT).unlink(missing_ok=True)
