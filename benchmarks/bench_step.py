"""Time one TopK SAE training step (loss, gradients, optimizer) against the encoder product.

    .venv/bin/python benchmarks/bench_step.py [--n 4096 16384 65536] [--batch 4096] [--d 576]
                                              [--k 32] [--repeats N] [--no-memory]
                                              [--device cpu|cuda]

For every n, all implementations train a copy of the same initial SAE on the same batch x
and the same dead-latent mask, in one process, on ``--device``. The implementations take
turns round by round, so that a load change on the machine hits all of them alike; in a
round each runs one untimed step and then the timed one. The table gives the median over
the rounds.

    floor fraction = median time of the encoder product (x − b_pre) W_encᵀ + b_enc alone
                     / median time of the implementation's whole step

On the CPU everything is fp32. On CUDA every training step runs under
``torch.autocast(bfloat16)`` (as the trainer with ``train.autocast_bf16``, and as the peers'
own trainers run), and the floor is the same product on bf16 operands cast beforehand, so
that the fraction is against the bf16 GEMM alone; the clock waits for the GPU
(``torch.cuda.synchronize``) before it starts and stops.

Every step uses torch.optim.Adam (eps 6.25e-10; fused=True where torch offers it), so the
rows differ only in how the loss and gradients are computed and in what each library's
own training step adds (listed in the table). Peak memory is measured per implementation in
a fresh subprocess (see ``step_memory_mib``; on CUDA the allocator's peak).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from peers import saelens_step, time_steps
from saesweep.sae.topk_kernels import dense_reference_step, sparse_step
from saesweep.sae.topk import TopKSAE
from saesweep.train.trainer import make_adam

ADAM_EPS = 6.25e-10
LR = 1e-4


@dataclass
class Setup:
    """The shapes and the shared data of one benchmark row group."""

    d: int
    n: int
    k: int
    batch: int
    k_aux: int
    aux_coef: float
    dead_fraction: float
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.batch, self.d, generator=generator)  # E‖x‖² = d
        self.dead = (torch.rand(self.n, generator=generator) < self.dead_fraction).to(self.device)
        self.sae = TopKSAE(self.d, self.n, {"k": self.k})
        self.sae.initialise(x[:1024], generator)
        self.sae.to(self.device)
        self.x = x.to(self.device)

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    def autocast(self) -> torch.autocast:
        """bf16 autocast on CUDA (as the trainer's ``train.autocast_bf16``), off on the CPU."""
        return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.gpu)


@dataclass
class Implementation:
    name: str
    auxk: str
    includes: str
    build: Callable[[Setup], Callable[[], object] | None]


def adam(parameters) -> torch.optim.Adam:
    """The optimizer saesweep's trainer uses (fused where torch has it), for every row."""
    return make_adam(parameters, LR, ADAM_EPS)


def build_floor(reuse_output: bool) -> Callable[[Setup], Callable[[], object]]:
    def build(setup: Setup) -> Callable[[], object]:
        sae = setup.sae
        dtype = torch.bfloat16 if setup.gpu else torch.float32
        b_enc, W_enc = sae.b_enc.detach().to(dtype), sae.W_enc.detach().to(dtype)
        out = torch.empty(setup.batch, setup.n, dtype=dtype, device=setup.device) if reuse_output else None

        @torch.no_grad()
        def step() -> object:
            return torch.addmm(b_enc, (setup.x - sae.b_pre).to(dtype), W_enc.t(), out=out)

        return step

    return build


def build_saesweep(step_fn) -> Callable[[Setup], Callable[[], object]]:
    def build(setup: Setup) -> Callable[[], object]:
        sae = copy.deepcopy(setup.sae)
        optimizer = adam(sae.parameters())

        def step() -> object:
            with setup.autocast():
                step_fn(sae, setup.x, setup.dead, setup.k_aux, setup.aux_coef)
            sae.before_optimizer_step()
            optimizer.step()
            sae.after_optimizer_step()

        return step

    return build


def build_sparsify(setup: Setup) -> Callable[[], object] | None:
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints which decoder it uses
            from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    coder = SparseCoder(setup.d, SparseCoderConfig(num_latents=setup.n, k=setup.k), device=setup.device)
    with torch.no_grad():
        coder.encoder.weight.copy_(setup.sae.W_enc)
        coder.encoder.bias.copy_(setup.sae.b_enc)
        coder.W_dec.copy_(setup.sae.W_dec)
        coder.b_dec.copy_(setup.sae.b_pre)
    optimizer = adam(coder.parameters())

    def step() -> object:
        coder.set_decoder_norm_to_unit_norm()
        with setup.autocast():
            out = coder(setup.x, dead_mask=setup.dead)
        (out.fvu + setup.aux_coef * out.auxk_loss).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()

    return step


def build_saelens(setup: Setup) -> Callable[[], object] | None:
    step = saelens_step("topk", setup.sae, setup.x, setup.dead, setup.aux_coef, adam, setup.device)
    if step is None:
        return None

    def autocast_step() -> object:
        with setup.autocast():  # it decides the forward's dtypes; backward follows them
            return step()

    return autocast_step


def other_products(sae, x, dead, k_aux, aux_coef) -> object:
    """``sparse_step`` with the product path its device does not choose (``gather`` on the
    CPU, ``csr`` on CUDA): what the choice by device gains."""
    products = "csr" if x.device.type == "cuda" else "gather"
    return sparse_step(sae, x, dead, k_aux, aux_coef, products=products)


OPTIMIZER_STEP = "Adam step"
IMPLEMENTATIONS = [
    Implementation(
        "floor: encoder product",
        "-",
        "torch.addmm as in TopKSAE.pre_activations, alone",
        build_floor(reuse_output=False),
    ),
    Implementation(
        "encoder product, reused output",
        "-",
        "the same addmm into a preallocated (B, n) output (no page faults)",
        build_floor(reuse_output=True),
    ),
    Implementation(
        "saesweep sparse_step",
        "yes (--k-aux)",
        f"loss+grads, decoder-grad projection, {OPTIMIZER_STEP}, decoder renorm",
        build_saesweep(sparse_step),
    ),
    Implementation(
        "saesweep, the other device's products",
        "yes (--k-aux)",
        "the same with the product path of the other device (CPU: gather, CUDA: csr)",
        build_saesweep(other_products),
    ),
    Implementation(
        "saesweep dense reference",
        "yes (--k-aux)",
        f"autograd loss+grads, projection, {OPTIMIZER_STEP}, renorm",
        build_saesweep(dense_reference_step),
    ),
    Implementation(
        "eai-sparsify SparseCoder",
        "yes (k_aux=d/2)",
        f"renorm, forward+backward (decoder: eager on CPU, Triton on CUDA), projection, {OPTIMIZER_STEP}",
        build_sparsify,
    ),
    Implementation(
        "SAELens TopKTrainingSAE",
        "yes (k_aux=d/2)",
        f"training_forward_pass+backward, clip_grad_norm_, {OPTIMIZER_STEP}",
        build_saelens,
    ),
]


def step_memory_mib(setup: Setup, name: str, steps: int = 3) -> float:
    """Peak resident memory (VmHWM) during ``steps`` steps minus the resident memory (VmRSS)
    once the data, the SAE and the optimizer exist: the step's temporaries plus what the first
    step creates and keeps (gradients, Adam moments: ≈ 3 × the parameters, alike for all).
    The high-water mark is reset (Linux /proc/self/clear_refs) after set-up, so imports and
    set-up do not count. On CUDA: the allocator's peak during the steps minus what was
    allocated before them."""
    step = next(i for i in IMPLEMENTATIONS if i.name == name).build(setup)
    assert step is not None
    if setup.gpu:  # the same on the GPU's allocator: peak allocated minus allocated before
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _proc_status_kib("VmRSS")
    for _ in range(steps):
        step()
    return (_proc_status_kib("VmHWM") - before) / 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def measure_memory(args: argparse.Namespace, n: int, name: str) -> str:
    command = [sys.executable, __file__, *_shape_args(args), "--n", str(n), "--child", name]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return "failed"
    return f"{float(result.stdout.strip().splitlines()[-1]):,.0f}"


def _shape_args(args: argparse.Namespace) -> list[str]:
    return [
        *("--d", str(args.d), "--k", str(args.k), "--batch", str(args.batch)),
        *("--k-aux", str(args.k_aux), "--aux-coef", str(args.aux_coef)),
        *("--dead-fraction", str(args.dead_fraction), "--device", args.device),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16384], help="numbers of latents")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--d", type=int, default=576, help="input width")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--k-aux", type=int, default=None, help="default d/2 as in both peers")
    parser.add_argument("--aux-coef", type=float, default=1 / 32)
    parser.add_argument("--dead-fraction", type=float, default=0.1, help="random dead mask")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=1, help="steps before the first round")
    parser.add_argument("--only", nargs="+", help="implementation names to run (prefixes)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast there)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.k_aux = args.k_aux or args.d // 2

    def setup_for(n: int) -> Setup:
        return Setup(args.d, n, args.k, args.batch, args.k_aux, args.aux_coef, args.dead_fraction, args.device)

    if args.child:
        print(step_memory_mib(setup_for(args.n[0]), args.child))
        return

    where = (
        f"{torch.cuda.get_device_name(args.device)}, bf16 autocast, floor: bf16 product"
        if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads, fp32 CPU"
    )
    print(
        f"torch {torch.__version__}, {where}; "
        f"d={args.d} k={args.k} batch={args.batch} k_aux={args.k_aux} α={args.aux_coef:g} "
        f"dead fraction={args.dead_fraction:g}; median of {args.repeats} after {args.warmup} warm-up"
    )
    chosen = [
        i for i in IMPLEMENTATIONS if not args.only or any(i.name.startswith(o) for o in args.only)
    ]
    if chosen[0] is not IMPLEMENTATIONS[0]:
        chosen.insert(0, IMPLEMENTATIONS[0])
    for n in args.n:
        setup = setup_for(n)
        steps = {i.name: i.build(setup) for i in chosen}
        available = {name: step for name, step in steps.items() if step is not None}
        synchronize = torch.cuda.synchronize if setup.gpu else lambda: None
        seconds = time_steps(available, args.warmup, args.repeats, synchronize)
        del available, steps
        floor = seconds[IMPLEMENTATIONS[0].name]
        print(f"\nn = {n}")
        header = (
            "implementation",
            "AuxK",
            "ms/step",
            "tokens/s",
            "floor frac",
            "step MiB",
            "includes",
        )
        rows = [header]
        for implementation in chosen:
            name = implementation.name
            if name not in seconds:
                rows.append((name, "-", "not installed", "", "", "", ""))
                continue
            memory = "" if args.no_memory else measure_memory(args, n, name)
            rows.append(
                (
                    name,
                    implementation.auxk,
                    f"{seconds[name] * 1e3:,.1f}",
                    f"{args.batch / seconds[name]:,.0f}",
                    f"{floor / seconds[name]:.2f}",
                    memory,
                    implementation.includes,
                )
            )
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        for row in rows:
            print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
