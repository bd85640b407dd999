"""Time every registered architecture's training step against its own floor, in one process.

    .venv/bin/python benchmarks/bench_architectures.py [--n 4096] [--batch 2048] [--d 576]
                                                       [--repeats 5] [--only topk relu …]

Each architecture trains a copy of an SAE built with its standard-test parameters (``example``;
k = 32 for the k architectures) on the same batch x (E‖x‖² = d) with a 10% random dead mask
for AuxK, through the interface the trainer uses: ``training_step``, ``before_optimizer_step``,
Adam (fused where torch has it), ``after_optimizer_step``. Steps take turns round by round
(one untimed, one timed), so a load change hits all alike; the table gives medians.

    floor          = the dense products the step cannot avoid: the encoder product
                     (x − b_pre) W_encᵀ + b_enc for architectures whose codes are a selection
                     (TopK, Multi-TopK, BatchTopK), plus the decoder product z W_dec for those
                     whose codes are dense before thresholding (ReLU, JumpReLU, Gated), timed alone
    floor fraction = floor time / step time   (1.0: the step costs only its floor)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from saesweep.sae.base import StepContext
from saesweep.sae.registry import ARCHITECTURES, build_sae, resolve_params
from saesweep.train.trainer import make_adam

SELECTION_ARCHITECTURES = ("topk", "multitopk", "batchtopk")


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


def architecture_step(sae, x: torch.Tensor, context: StepContext) -> Callable[[], object]:
    optimizer = make_adam(sae.parameters(), 1e-4, 6.25e-10, sae.adam_betas)

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
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.d, generator=generator)
    dead = torch.rand(args.n, generator=generator) < 0.1
    context = StepContext(dead_mask=dead, k_aux=args.d // 2, aux_coef=1 / 32, progress=0.5, fire_threshold=1e-3)
    steps: dict[str, Callable[[], object]] = {}
    for name in args.only:
        given = {**ARCHITECTURES[name].example}
        if "k" in given:
            given["k"] = args.k
        sae = build_sae(name, args.d, args.n, resolve_params(name, given, "benchmark"))
        sae.initialise(x[:512], torch.Generator().manual_seed(1))
        uses_context = context if sae.uses_auxk else StepContext(None, 0, 0.0, 0.5, 1e-3)
        steps[name] = architecture_step(sae, x, uses_context)
        steps[f"floor:{name}"] = floor_step(copy.deepcopy(sae), x, name not in SELECTION_ARCHITECTURES)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            step()
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    print(f"d={args.d} n={args.n} batch={args.batch} k={args.k} threads={torch.get_num_threads()} "
          f"median of {args.repeats} rounds\n")
    print(f"{'architecture':<12} {'floor':>22} {'step ms':>9} {'floor ms':>9} {'floor fraction':>15} {'tokens/s':>10}")
    for name in args.only:
        step_time = statistics.median(times[name])
        floor_time = statistics.median(times[f"floor:{name}"])
        floor = "encoder" if name in SELECTION_ARCHITECTURES else "encoder + decoder"
        print(f"{name:<12} {floor:>22} {1e3 * step_time:9.1f} {1e3 * floor_time:9.1f} "
              f"{floor_time / step_time:15.2f} {args.batch / step_time:10.0f}")


if __name__ == "__main__":
    main()
