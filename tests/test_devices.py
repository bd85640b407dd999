"""The SAE side on a second device: what a step, a map or a hook computes stays on the
device of the SAE and the batch (no tensor created on the CPU and mixed in).

Two second devices:

- ``fake-cuda``, always: ``FakeTensorMode`` (with a ShapeEnv, so ops whose output size
  depends on the data, like ``masked_select``, run), where tensors made with device="cuda"
  are fake CUDA tensors without data, and an op mixing one with a CPU tensor (other than a
  0-dim one, which torch allows on CUDA too) raises ``FakeTensorDeviceMismatchError``. On a
  CPU-only torch it cannot run autograd (building a graph on a fake CUDA tensor aborts the
  process), ``nonzero`` / boolean indexing, CSR tensors or ``.item()``: so the parameters
  do not require gradients there, and it runs what needs none of these: the TopK and
  Multi-TopK training step (its CUDA form, ``topk_gather``, which was written to need none
  of them), the optimizer hooks, Adam, the forward maps on dense codes, and the
  torch.distributed collectives' merge with simulated shards.
- ``cuda``, when a GPU is visible: the same, with real data, plus what the fake device
  cannot run (every architecture's ``training_step`` and ``reference_step``, ``encode`` to
  sparse codes, the sparse decode), each compared with the same computation on the CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from conftest import CPU
from saesweep.sae.base import SparseAutoencoder, StepContext
from saesweep.evaluation.evaluate import evaluate_cell
from saesweep.plan.cells import make_cell
from saesweep.plan.settings import activation_dir, eval_settings, train_settings
from saesweep.sae.export import load_sae
from saesweep.sae.registry import ARCHITECTURES, build_sae, resolve_params
from saesweep.sae.topk_kernels import sparse_step
from saesweep.train import distributed
from saesweep.train.distributed import Layout, ProcessGroups
from saesweep.train.launch import train_cell
from saesweep.train.trainer import make_adam
from test_architectures import planted, planted_settings, tiny_run, train_stopped_and_resumed  # noqa: F401 (fixtures)

DEVICES = ["fake-cuda", *(["cuda"] if torch.cuda.is_available() else [])]
NAMES = sorted(ARCHITECTURES)
SELECTION = ["topk", "multitopk"]
D, N, BATCH = 16, 64, 48


@contextmanager
def second_device(kind: str) -> Iterator[None]:
    """Inside: tensors made with device="cuda" are on the second device ``kind``."""
    if kind == "fake-cuda":
        with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()):
            yield
    else:
        yield


def on_device(sae: SparseAutoencoder, kind: str) -> SparseAutoencoder:
    """``sae`` moved to the second device (``cuda``), or with every parameter and buffer
    replaced by a fake CUDA tensor of its shape and dtype, not requiring gradients (autograd
    on fake CUDA tensors aborts a CPU-only torch); call inside ``second_device`` with a copy
    made outside it."""
    if kind == "cuda":
        return sae.to("cuda")
    fake = sae
    for name, parameter in list(fake.named_parameters()):
        setattr(fake, name, nn.Parameter(torch.empty(parameter.shape, dtype=parameter.dtype, device="cuda"),
                                         requires_grad=False))
    for name, buffer in list(fake.named_buffers()):
        fake.register_buffer(name, torch.empty(buffer.shape, dtype=buffer.dtype, device="cuda"))
    return fake


def example_sae(name: str, n: int = N) -> SparseAutoencoder:
    generator = torch.Generator().manual_seed(0)
    sae = build_sae(name, D, n, resolve_params(name, ARCHITECTURES[name].example, "example"))
    sae.initialise(torch.randn(256, D, generator=generator), generator)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return sae


def batch_and_dead(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return 2 * torch.randn(BATCH, D, generator=generator), torch.rand(n, generator=generator) < 0.3


def context(dead: torch.Tensor | None, collectives=None) -> StepContext:
    return StepContext(dead_mask=dead, k_aux=8, aux_coef=1 / 32, progress=0.5, fire_threshold=1e-3,
                       collectives=collectives)


def assert_on_cuda(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        assert tensor.device.type == "cuda", tensor.device


def assert_same(got: torch.Tensor, expected: torch.Tensor, kind: str, **tolerances) -> None:
    """With real data (``cuda``), ``got`` equals the CPU's ``expected``."""
    if kind == "cuda":
        torch.testing.assert_close(got.cpu(), expected, **tolerances)


@pytest.mark.parametrize("auxk", [True, False])
@pytest.mark.parametrize("name", SELECTION)
@pytest.mark.parametrize("kind", DEVICES)
def test_topk_training_iteration_stays_on_the_device(kind: str, name: str, auxk: bool) -> None:
    """The trainer's iteration (training step in its CUDA form, decoder-gradient projection,
    Adam, renormalisation) on the second device: every output and gradient there, and on a
    real GPU the same loss and gradients as the CPU step."""
    sae = example_sae(name)
    x, dead = batch_and_dead()
    cpu, device_sae = copy.deepcopy(sae), copy.deepcopy(sae)
    expected = cpu.training_step(x, context(dead if auxk else None))
    with second_device(kind):
        device_sae = on_device(device_sae, kind)
        device_x = x.to("cuda") if kind == "cuda" else torch.randn(BATCH, D, device="cuda")
        device_dead = dead.to("cuda") if kind == "cuda" else torch.zeros(N, dtype=torch.bool, device="cuda")
        out = device_sae.training_step(device_x, context(device_dead if auxk else None))
        assert_on_cuda(out.loss, out.fired, *out.parts.values(), *(p.grad for p in device_sae.parameters()))
        assert out.parts.keys() == expected.parts.keys()
        for part, value in out.parts.items():
            assert_same(value, expected.parts[part], kind, rtol=1e-4, atol=1e-6)
        for (parameter_name, got), (_, want) in zip(device_sae.named_parameters(), cpu.named_parameters()):
            assert_same(got.grad, want.grad, kind, rtol=1e-3, atol=1e-5 * want.grad.abs().max().item())
        optimizer = make_adam(device_sae.parameters(), 1e-3, 1e-8)
        device_sae.before_optimizer_step()
        optimizer.step()
        device_sae.after_optimizer_step()
        assert_on_cuda(*device_sae.parameters(), *optimizer.state[device_sae.W_dec].values())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", DEVICES)
def test_forward_maps_and_hooks_stay_on_the_device(kind: str, name: str) -> None:
    """pre-activations, the inference codes (dense), the decode, the inference extras and
    the optimizer hooks of every architecture on the second device; on a real GPU also the
    sparse codes of ``encode`` and their decode, equal to the CPU's."""
    sae = example_sae(name)
    x, _ = batch_and_dead()
    with torch.no_grad():
        expected = sae.decode(sae.activate(sae.pre_activations(x)))
        with second_device(kind):
            device_sae = on_device(sae, kind)
            device_x = x.to("cuda") if kind == "cuda" else torch.randn(BATCH, D, device="cuda")
            codes = device_sae.activate(device_sae.pre_activations(device_x))
            reconstruction = device_sae.decode(codes)
            assert_on_cuda(codes, reconstruction, *device_sae.inference_extras().values())
            assert_same(reconstruction, expected, kind, rtol=1e-4, atol=1e-5)
            if kind == "cuda":  # CSR codes cannot be made on the fake device
                sparse = device_sae.encode(device_x)
                assert sparse.device.type == "cuda"
                assert_same(device_sae.decode(sparse), expected, kind, rtol=1e-4, atol=1e-5)
            for parameter in device_sae.parameters():
                parameter.grad = torch.ones_like(parameter)
            device_sae.before_optimizer_step()
            device_sae.after_optimizer_step()
            assert_on_cuda(*device_sae.parameters(), device_sae.W_dec.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autograd, nonzero and CSR need a real GPU")
@pytest.mark.parametrize("name", NAMES)
def test_every_training_step_on_a_gpu_is_the_cpu_step(name: str) -> None:
    """Every architecture's ``training_step`` and ``reference_step`` on the GPU give the CPU's
    loss, parts and gradients (float64, so the comparison is tight)."""
    sae = example_sae(name).double()
    x, dead = batch_and_dead()
    x = x.double()
    for step in ("training_step", "reference_step"):
        cpu, gpu = copy.deepcopy(sae), copy.deepcopy(sae).to("cuda")
        expected = getattr(cpu, step)(x, context(dead))
        out = getattr(gpu, step)(x.to("cuda"), context(dead.to("cuda")))
        assert_on_cuda(out.loss, out.fired, *out.parts.values())
        torch.testing.assert_close(out.loss.cpu(), expected.loss, rtol=1e-9, atol=1e-12)
        for (parameter_name, got), (_, want) in zip(gpu.named_parameters(), cpu.named_parameters()):
            torch.testing.assert_close(got.grad.cpu(), want.grad, rtol=1e-7, atol=1e-10, msg=parameter_name)


class SimulatedShards:
    """torch.distributed's all_reduce and all_gather for S latent shards that all hold the
    same tensors, in one process: a sum is S times the tensor, a gather S copies of it."""

    def __init__(self, shards: int) -> None:
        self.shards = shards

    def all_reduce(self, tensor: torch.Tensor, group=None, op=None) -> None:
        tensor.mul_(self.shards)

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor, group=None) -> None:
        for output in outputs:
            output.zero_().add_(tensor)  # not copy_: it cannot run on fake CUDA tensors


def shard_groups(shards: int, n: int, monkeypatch: pytest.MonkeyPatch) -> ProcessGroups:
    """The ``ProcessGroups`` of shard 0 of ``shards`` (one replica) with simulated collectives."""
    monkeypatch.setattr(distributed, "dist", SimulatedShards(shards))
    groups = ProcessGroups.__new__(ProcessGroups)  # no process group to create
    groups.layout, groups.device, groups.shards = Layout(1, shards), "cuda", shards
    groups.offset, groups.n_local = 0, n // shards
    groups.shard_group = groups.data_group = None
    return groups


@pytest.mark.parametrize("kind", DEVICES)
def test_distributed_merge_and_sums_stay_on_the_device(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard 0 of 2 (simulated: the other shard holds the same candidates): the merge of the
    top-k candidates, with and without ``ids``, and the shard sums of a TopK step in its CUDA
    form, on the second device. The 2k gathered candidates of a row are its k candidates
    twice, so on a real GPU its merged top-k is its 2 largest values twice each."""
    groups = shard_groups(2, N, monkeypatch)
    sae = example_sae("topk", N // 2)
    x, dead = batch_and_dead(N // 2)
    with second_device(kind):
        device_x = x.to("cuda") if kind == "cuda" else torch.randn(BATCH, D, device="cuda")
        values = device_x[:, :4] if kind == "cuda" else torch.randn(BATCH, 4, device="cuda")
        positions = torch.arange(4, device="cuda").repeat(BATCH, 1)
        ids = torch.arange(4, 8, device="cuda")
        for given_ids in (None, ids):
            top, local = groups.merge(values, positions, 4, given_ids)
            assert_on_cuda(top, local)
            if kind == "cuda":
                largest = values.topk(2, dim=1).values.repeat(1, 2)
                assert_same(top.sort(dim=1).values, largest.sort(dim=1).values.cpu(), kind)
        device_sae = on_device(sae, kind)
        device_dead = dead.to("cuda") if kind == "cuda" else torch.zeros(N // 2, dtype=torch.bool, device="cuda")
        out = sparse_step(device_sae, device_x, device_dead, 8, 1 / 32, collectives=groups)
        assert_on_cuda(out.loss, out.indices, out.values, *(p.grad for p in device_sae.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cell_trained_on_a_gpu_resumes_from_its_checkpoint(planted, monkeypatch, tmp_path) -> None:  # noqa: F811
    """A TopK cell on the GPU stopped by SIGTERM resumes from its checkpoint (whose RNG state
    must come back on the CPU) and ends close to an uninterrupted run (index additions on the
    GPU are not bit-reproducible)."""
    activations, _ = planted
    settings = planted_settings("topk", activations, tokens=20_480, device="cuda", autocast_bf16=True)
    train_cell(settings, tmp_path / "uninterrupted", threads=1)
    train_stopped_and_resumed(settings, tmp_path / "resumed", monkeypatch)
    resumed, _ = load_sae(tmp_path / "resumed", CPU)
    uninterrupted, _ = load_sae(tmp_path / "uninterrupted", CPU)
    cosine = torch.nn.functional.cosine_similarity(resumed.W_dec, uninterrupted.W_dec, dim=1)
    assert cosine.mean() > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", NAMES)
def test_a_tiny_cell_trains_on_a_gpu_and_evaluates(name: str, tiny_run, tmp_path) -> None:  # noqa: F811
    """The tiny workflow's train and evaluate stages for a cell with train.device and
    evaluate.device cuda (bf16 autocast, held-out curve and checkpoints on): it trains, its log
    and weights are finite, and its evaluation, SAE and LM on the GPU, is in range."""
    folder, config = tiny_run
    cell = make_cell(name, 64, {**ARCHITECTURES[name].example}, 0).name
    settings = train_settings(config, "resid2", cell)
    eval_folder = str(folder / activation_dir(config, "resid2", "eval"))
    settings = replace(settings, activations=str(folder / activation_dir(config, "resid2", "train")), device="cuda",
                       autocast_bf16=True, heldout=replace(settings.heldout, activations=eval_folder))
    train_cell(settings, tmp_path / cell, threads=1)
    sae, cfg = load_sae(tmp_path / cell, CPU)
    assert all(torch.isfinite(parameter).all() for parameter in sae.parameters())
    assert 0 <= cfg["training"]["final_nmse"] < 2
    evaluation = replace(eval_settings(config, "resid2", cell), eval_activations=eval_folder, device="cuda")
    metrics = evaluate_cell(evaluation, tmp_path / cell, tmp_path / cell / "metrics.json")
    assert 0 <= metrics["nmse"] < 2 and 0 <= metrics["dead_fraction"] <= 1
