"""Shared by the step benchmarks: interleaved timing, and SAELens' training SAE of an
architecture as a twin of a saesweep SAE (same weights, same batch)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

# saesweep architecture → (SAELens training SAE, its config class, the config's sparsity key,
# saesweep's parameter giving its value, SAELens' coefficient name); Multi-TopK has no twin.
SAELENS_TWINS = {
    "topk": ("TopKTrainingSAE", "TopKTrainingSAEConfig", "k", "k", None),
    "batchtopk": ("BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig", "k", "k", None),
    "relu": ("StandardTrainingSAE", "StandardTrainingSAEConfig", None, "l1_coef", "l1"),
    "jumprelu": ("JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig", None, "l0_coef", "l0"),
    "gated": ("GatedTrainingSAE", "GatedTrainingSAEConfig", None, "l1_coef", "l1"),
}


def time_steps(steps: dict[str, Callable[[], object]], warmup: int, repeats: int,
               synchronize: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per step. Rounds interleave the implementations; in a round each one
    runs an untimed step, then the timed one, so that a timed step follows a step of the same
    implementation (as in training: memory and allocator state as it leaves them).
    ``synchronize`` waits for queued device work (``torch.cuda.synchronize`` on a GPU), before
    the clock starts and before it stops."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            step()
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def saelens_step(
    arch: str,
    sae,
    x: torch.Tensor,
    dead: torch.Tensor | None,
    aux_coef: float,
    optimizer_for: Callable[[object], torch.optim.Optimizer],
    device: str = "cpu",
) -> Callable[[], object] | None:
    """One SAELens training step (``SAETrainer._train_step`` without its firing statistics:
    forward pass with its losses, backward, gradient clipping, Adam) on the weights of the
    saesweep SAE ``sae`` (on ``device``, as ``x`` and ``dead``), with the optimizer
    ``optimizer_for(parameters)``; None when SAELens is not installed or has no twin of ``arch``."""
    if arch not in SAELENS_TWINS:
        return None
    try:
        import sae_lens
        from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        return None
    model_name, config_name, sparsity_key, param, coefficient = SAELENS_TWINS[arch]
    options = {"aux_loss_coefficient": aux_coef} if arch in ("topk", "batchtopk") else {}
    if sparsity_key:
        options[sparsity_key] = int(sae.params[param])
    config = getattr(sae_lens, config_name)(d_in=sae.d, d_sae=sae.n, dtype="float32", device=device, **options)
    twin = getattr(sae_lens, model_name)(config).to(device)
    with torch.no_grad():
        twin.W_enc.copy_(sae.W_enc.t())
        twin.W_dec.copy_(sae.W_dec)
        twin.b_dec.copy_(sae.b_pre)
        if arch == "gated":
            twin.b_gate.copy_(sae.b_enc)
            twin.r_mag.copy_(sae.r_mag)
            twin.b_mag.copy_(sae.b_mag)
        else:
            twin.b_enc.copy_(sae.b_enc)
        if arch == "jumprelu":
            twin.threshold.copy_(sae.log_threshold.exp())
    optimizer = optimizer_for(twin.parameters())
    step_input = TrainStepInput(
        sae_in=x,
        coefficients={coefficient: float(sae.params[param])} if coefficient else {},
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=False,
    )

    def step() -> object:
        twin.training_forward_pass(step_input).loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step
