"""Time every registered architecture's training step against its own floor, in one process.

    .venv/bin/python benchmarks/bench_architectures.py [--n 4096] [--batch 2048] [--d 576]
                                                       [--repeats 5] [--only topk relu …]

Each architecture trains a copy of an SAE built with its standard-test parameters (``example``;
k = 32 for the k architectures) on the same batch x (E‖x‖² = d) with a 10% random dead mask
for AuxK, through the interface the trainer uses: ``training_step``, ``before_optimizer_step``,
Adam (fused where torch has it), ``after_optimizer_step``. Steps take turns round by round
(one untimed, one timed), so a load change hits all alike; the table gives medians. Beside
each, where SAELens has the architecture, its training SAE with the same weights on the same
batch (forward with its losses, backward, gradient clipping, the same Adam).

Architectures whose L0 is an outcome of training (ReLU, JumpReLU, Gated) are timed twice:
as initialised (about half the codes active: the support kernels' dense form) and with
b_enc shifted by one constant, found by bisection, so that the batch's L0 is k, the state a
trained SAE of the same sparsity as the k architectures is in (the sparse form).

    floor          = the dense products the step cannot avoid: the encoder product
                     (x − b_pre) W_encᵀ + b_enc for architectures whose codes are a selection
                     (TopK, Multi-TopK, BatchTopK), plus the decoder product z W_dec for those
                     whose codes are dense before thresholding (ReLU, JumpReLU, Gated), timed alone
    floor fraction = floor time / step time   (1.0: the step costs only its floor)
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch

from peers import saelens_step, time_steps
from saesweep.sae.base import StepContext
from saesweep.sae.registry import ARCHITECTURES, build_sae, resolve_params
from saesweep.train.trainer import make_adam

SELECTION_ARCHITECTURES = ("topk", "multitopk", "batchtopk", "matryoshka", "matryoshkatopk")


@torch.no_grad()
def shift_to_l0(sae, x: torch.Tensor, l0: float) -> None:
    """Add one constant to b_enc so that the mean number of active codes of x is ``l0``."""
    def measured() -> float:
        return sae.encode(x).values().gt(0).sum().item() / len(x)

    low, high = -20.0, 20.0  # shifts with L0 below and above the target
    start = sae.b_enc.clone()
    for _ in range(30):
        middle = (low + high) / 2
        sae.b_enc.copy_(start + middle)
        low, high = (low, middle) if measured() > l0 else (middle, high)


def floor_step(sae, x: torch.Tensor, with_decoder: bool) -> Callable[[], object]:
    """The unavoidable products alone, into reused outputs."""
    pre = torch.empty(len(x), sae.n)
    out = torch.empty(len(x), sae.d)
    codes = torch.rand(len(x), sae.n)

    def step() -> object:
        with torch.no_grad():
            torch.addmm(sae.b_enc, x - sae.b_pre, sae.W_enc.t(), out=pre)
            if with_decoder:
                torch.mm(codes, sae.W_dec, out=out)
        return pre

    return step


def make_optimizer(sae) -> Callable[[object], torch.optim.Optimizer]:
    """The trainer's Adam with the architecture's betas, for saesweep's SAE and its twin."""
    return lambda parameters: make_adam(parameters, 1e-4, 6.25e-10, sae.adam_betas)


def architecture_step(sae, x: torch.Tensor, context: StepContext) -> Callable[[], object]:
    optimizer = make_optimizer(sae)(sae.parameters())

    def step() -> object:
        output = sae.training_step(x, context)
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
        return output

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=32, help="k of the architectures that have one")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", default=sorted(ARCHITECTURES))
    parser.add_argument("--no-peers", action="store_true", help="skip the SAELens twins")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.d, generator=generator)
    dead = torch.rand(args.n, generator=generator) < 0.1
    context = StepContext(dead_mask=dead, k_aux=args.d // 2, aux_coef=1 / 32, progress=0.5, fire_threshold=1e-3)
    steps: dict[str, Callable[[], object]] = {}
    rows: list[tuple[str, str, str]] = []  # (row label, architecture, state)
    for name in args.only:
        given = {**ARCHITECTURES[name].example}
        if "k" in given:
            given["k"] = args.k
        states = ["trained"] if name in SELECTION_ARCHITECTURES else ["init", f"L0={args.k}"]
        for state in states:
            sae = build_sae(name, args.d, args.n, resolve_params(name, given, "benchmark"))
            sae.initialise(x[:512], torch.Generator().manual_seed(1))
            if state.startswith("L0"):
                shift_to_l0(sae, x, args.k)
            label = f"{name} {state}"
            uses_context = context if sae.uses_auxk else StepContext(None, 0, 0.0, 0.5, 1e-3)
            twin = None if args.no_peers else saelens_step(
                name, copy.deepcopy(sae), x, uses_context.dead_mask, uses_context.aux_coef, make_optimizer(sae)
            )
            if twin is not None:
                steps[f"saelens:{label}"] = twin
            steps[f"floor:{label}"] = floor_step(copy.deepcopy(sae), x, name not in SELECTION_ARCHITECTURES)
            steps[label] = architecture_step(sae, x, uses_context)
            rows.append((label, name, state))
    seconds = time_steps(steps, warmup=0, repeats=args.repeats)
    print(f"d={args.d} n={args.n} batch={args.batch} k={args.k} threads={torch.get_num_threads()} "
          f"median of {args.repeats} rounds; SAELens: the same weights in its training SAE\n")
    print(f"{'architecture':<12} {'state':<8} {'floor':>18} {'floor ms':>9} {'step ms':>9} "
          f"{'fraction':>9} {'SAELens ms':>11} {'fraction':>9} {'ours/SAELens':>13}")
    for label, name, state in rows:
        step_time, floor_time = seconds[label], seconds[f"floor:{label}"]
        floor = "encoder" if name in SELECTION_ARCHITECTURES else "encoder + decoder"
        peer = seconds.get(f"saelens:{label}")
        peer_columns = (
            f"{1e3 * peer:11.1f} {floor_time / peer:9.2f} {peer / step_time:12.2f}×" if peer else f"{'-':>11} {'-':>9} {'-':>13}"
        )
        print(f"{name:<12} {state:<8} {floor:>18} {1e3 * floor_time:9.1f} {1e3 * step_time:9.1f} "
              f"{floor_time / step_time:9.2f} {peer_columns}")


if __name__ == "__main__":
    main()
