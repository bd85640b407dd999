"""sparse_step against dense_reference_step: same losses, same selected latents, same
gradients of every parameter (before and after the decoder-gradient projection)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saesweep.sae import topk_gather
from saesweep.sae import topk_kernels as kernels
from saesweep.sae.topk_kernels import PRODUCTS, SelectionStep, Wide, dense_reference_step, sparse_step
from saesweep.sae.topk import TopKSAE
from saesweep.sae.base import batch_variance

PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_pre")
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


@pytest.fixture(autouse=True)
def check_sparse_invariants():
    """sparse_step's CSR tensors must be valid: sorted, distinct column indices in each row
    (what CUDA's sparse kernels assume too)."""
    with torch.sparse.check_sparse_tensor_invariants():
        yield


def make_sae(d: int, n: int, k: int, dtype: torch.dtype, seed: int = 0) -> TopKSAE:
    """An SAE with random (not tied) encoder, unit-norm decoder rows and non-zero biases."""
    generator = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, n, {"k": k}).to(dtype)
    with torch.no_grad():
        decoder = torch.randn(n, d, generator=generator, dtype=dtype)
        sae.W_dec.copy_(decoder / decoder.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(torch.randn(n, d, generator=generator, dtype=dtype) / d**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(n, generator=generator, dtype=dtype))
        sae.b_pre.copy_(0.1 * torch.randn(d, generator=generator, dtype=dtype))
    return sae


def run(step, sae: TopKSAE, x, dead_mask, k_aux, aux_coef, project: bool = False, aux_normaliser: str = "input",
        products: str = "csr", wide: Wide | None = None):
    chosen = {"products": products} if step is sparse_step else {}
    out = step(sae, x, dead_mask, k_aux, aux_coef, wide, aux_normaliser=aux_normaliser, **chosen)
    if project:
        sae.before_optimizer_step()
    return out, {name: getattr(sae, name).grad.clone() for name in PARAMETERS}


def assert_same_step(sae, x, dead_mask, k_aux, aux_coef, rtol, atol, project=False, aux_normaliser="input",
                     products="csr", wide=None) -> SelectionStep:
    ref, ref_grads = run(dense_reference_step, sae, x, dead_mask, k_aux, aux_coef, project, aux_normaliser, wide=wide)
    out, grads = run(sparse_step, sae, x, dead_mask, k_aux, aux_coef, project, aux_normaliser, products, wide)
    # Same selected set per row (the order within a row is unspecified, as for topk).
    ref_order, order = ref.indices.argsort(dim=1), out.indices.argsort(dim=1)
    assert torch.equal(ref.indices.gather(1, ref_order), out.indices.gather(1, order))
    torch.testing.assert_close(out.values.gather(1, order), ref.values.gather(1, ref_order))
    for field in ("loss", "mse_loss", "aux_loss", "wide_loss"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), rtol=rtol, atol=atol)
    for name in PARAMETERS:
        scale = ref_grads[name].abs().max().clamp_min(1e-30)
        torch.testing.assert_close(
            grads[name] / scale,
            ref_grads[name] / scale,
            rtol=rtol,
            atol=atol,
            msg=lambda message, name=name: f"{name}: {message}",
        )
    return out


def random_dead(n: int, fraction: float, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < fraction


CASES = [  # d, n, k, dead fraction, k_aux
    (16, 64, 4, 0.0, 8),
    (16, 64, 4, 0.25, 8),
    (16, 64, 60, 0.25, 8),  # k close to n: the main and AuxK selections overlap
    (16, 64, 63, 0.5, 8),  # k = n − 1, the largest a cell may have
    (8, 48, 7, 0.1, 100),  # k_aux > number of dead latents
    (24, 256, 16, 0.05, 32),
    (16, 512, 8, 0.5, 16),  # an AuxK selection sparse among the dead latents
]


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("d, n, k, dead_fraction, k_aux", CASES)
def test_matches_reference_float64(d, n, k, dead_fraction, k_aux, project, products):
    sae = make_sae(d, n, k, torch.float64)
    x = torch.randn(40, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dead = random_dead(n, dead_fraction)
    out = assert_same_step(sae, x, dead, k_aux, 0.5, rtol=1e-10, atol=1e-12, project=project, products=products)
    assert (out.aux_loss > 0) == bool(dead.any())


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("d, n, k, dead_fraction, k_aux", CASES)
def test_matches_reference_float32(d, n, k, dead_fraction, k_aux, products):
    sae = make_sae(d, n, k, torch.float32)
    x = torch.randn(40, d, generator=torch.Generator().manual_seed(2))
    assert_same_step(sae, x, random_dead(n, dead_fraction), k_aux, 0.5, rtol=1e-4, atol=1e-5, products=products)


@pytest.mark.parametrize("dense_fraction", [0.0, 2.0])
@pytest.mark.parametrize("d, n, k, dead_fraction, k_aux", [c for c in CASES if c[3] > 0])
def test_sparse_and_dense_auxk_paths(monkeypatch, dense_fraction, d, n, k, dead_fraction, k_aux):
    """Forcing the dense (fraction 0) or the sparse (fraction 2) AuxK products gives the reference."""
    monkeypatch.setattr(kernels, "_DENSE_AUX_FRACTION", dense_fraction)
    sae = make_sae(d, n, k, torch.float64)
    x = torch.randn(40, d, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = assert_same_step(sae, x, random_dead(n, dead_fraction), k_aux, 0.5, rtol=1e-10, atol=1e-12, project=True)
    assert out.aux_loss > 0


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("dense_fraction", [0.0, 2.0])
def test_error_normalised_auxk(monkeypatch, dense_fraction, products):
    """aux_normaliser "error" divides L_aux by V_e = ‖e − ē‖² of the step's error instead of by
    V: the sparse step still matches the reference (dense and sparse AuxK products, and every
    product path: the CPU's and the gather path CUDA takes), and its AuxK loss and AuxK
    gradient are exactly V / V_e times those with "input"."""
    monkeypatch.setattr(kernels, "_DENSE_AUX_FRACTION", dense_fraction)
    sae = make_sae(16, 512, 8, torch.float64)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    dead = random_dead(512, 0.5)
    by_error = assert_same_step(sae, x, dead, 16, 0.5, rtol=1e-10, atol=1e-12, aux_normaliser="error", products=products)
    by_input, input_grads = run(sparse_step, sae, x, dead, 16, 0.5, products=products)
    _, main_grads = run(sparse_step, sae, x, dead, 16, 0.0, products=products)
    _, error_grads = run(sparse_step, sae, x, dead, 16, 0.5, aux_normaliser="error", products=products)
    error = x - sae.b_pre - torch.zeros(40, 512, dtype=x.dtype).scatter(1, by_input.indices, by_input.values) @ sae.W_dec
    ratio = batch_variance(x) / batch_variance(error)
    assert abs(ratio.item() - 1) > 0.5  # the two normalisers differ in this setting
    torch.testing.assert_close(by_error.aux_loss, by_input.aux_loss * ratio)
    for name in ("W_enc", "W_dec", "b_enc"):
        torch.testing.assert_close(error_grads[name] - main_grads[name], (input_grads[name] - main_grads[name]) * ratio)


@pytest.mark.parametrize(
    "dead_mask, k_aux, aux_coef",
    [
        (None, 8, 0.5),
        (torch.zeros(64, dtype=torch.bool), 8, 0.5),
        ("dead", 0, 0.5),
        ("dead", 8, 0.0),
    ],
)
@pytest.mark.parametrize("products", PRODUCTS)
def test_no_aux_cases(dead_mask, k_aux, aux_coef, products):
    """No dead latents, k_aux = 0 or α = 0: AuxK is skipped and its loss is exactly 0."""
    sae = make_sae(16, 64, 4, torch.float64)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = random_dead(64, 0.3) if isinstance(dead_mask, str) else dead_mask
    out = assert_same_step(sae, x, mask, k_aux, aux_coef, rtol=1e-10, atol=1e-12, products=products)
    assert out.aux_loss == 0


@pytest.mark.parametrize("products", PRODUCTS)
def test_inactive_latents(products):
    """Most selected pre-activations ≤ 0 (ReLU gives 0): no gradient flows through them."""
    sae = make_sae(16, 64, 8, torch.float64)
    with torch.no_grad():
        sae.b_enc.sub_(1.5)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = assert_same_step(sae, x, random_dead(64, 0.3), 16, 0.5, rtol=1e-10, atol=1e-12, products=products)
    assert 0 < (out.values == 0).float().mean() < 1


@pytest.mark.parametrize("products", PRODUCTS)
def test_ties_in_topk(products):
    """Latents 2i and 2i+1 have identical encoder rows, so every row of pre is made of tied
    pairs. With k even the top-k is a union of whole pairs, so the selected set (and so the
    gradient) is unambiguous; dead latents are even ones only, so AuxK has no ties."""
    d, n, k = 16, 64, 6
    sae = make_sae(d, n, k, torch.float64)
    with torch.no_grad():
        sae.W_enc[1::2] = sae.W_enc[0::2]
        sae.b_enc[1::2] = sae.b_enc[0::2]
    x = torch.randn(32, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        pre = sae.pre_activations(x)
    assert torch.equal(pre[:, 0::2], pre[:, 1::2])
    dead = torch.zeros(n, dtype=torch.bool)
    dead[0::4] = True
    out = assert_same_step(sae, x, dead, 5, 0.5, rtol=1e-10, atol=1e-12, project=True, products=products)
    pairs = out.indices.div(2, rounding_mode="floor").sort(dim=1).values
    assert torch.equal(pairs[:, 0::2], pairs[:, 1::2])  # whole pairs selected


@pytest.mark.parametrize("products", PRODUCTS)
def test_row_blocks(monkeypatch, products):
    """Encoding the batch in several row blocks, and (gather) forming the gradients in chunks
    of rows, changes nothing."""
    monkeypatch.setattr(kernels, "_BLOCK_ROWS", 7)  # the last block is shorter
    monkeypatch.setattr(topk_gather, "_BLOCK_ROWS", 7)
    monkeypatch.setattr(topk_gather, "_CHUNK_ELEMENTS", 3 * 16 * 16)  # 12 rows at k = 4, 6 at k_aux = 8
    sae = make_sae(16, 64, 4, torch.float64)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert_same_step(sae, x, random_dead(64, 0.25), 8, 0.5, rtol=1e-10, atol=1e-12, products=products)


@pytest.mark.parametrize("products", PRODUCTS)
def test_autocast_runs_the_encoder_product_in_bf16(products):
    """Inside torch.autocast(bf16) the selected values are those of the bf16 encoder product
    (cast back to fp32); loss and gradients stay close to the fp32 step's, in fp32."""
    sae = make_sae(16, 64, 4, torch.float32)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(9))
    dead = random_dead(64, 0.25)
    out, grads = run(sparse_step, sae, x, dead, 8, 0.5, products=products)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_out, low_grads = run(sparse_step, sae, x, dead, 8, 0.5, products=products)
    with torch.no_grad():
        low_pre = torch.addmm(sae.b_enc.bfloat16(), (x - sae.b_pre).bfloat16(), sae.W_enc.bfloat16().t())
    expected = low_pre.topk(4, dim=1).values.relu().float()
    assert torch.equal(low_out.values.sort(dim=1).values, expected.sort(dim=1).values)
    assert low_out.loss.dtype == torch.float32 and not torch.equal(low_out.loss, out.loss)
    torch.testing.assert_close(low_out.loss, out.loss, rtol=3e-2, atol=0)
    for name in PARAMETERS:
        assert low_grads[name].dtype == torch.float32
        torch.testing.assert_close(low_grads[name], grads[name], rtol=0.1, atol=0.05 * grads[name].abs().max().item())


@pytest.mark.parametrize("products", PRODUCTS)
def test_overwrites_existing_gradients(products):
    """The first step creates the .grad tensors; a later step overwrites the dense ones in
    place (nothing accumulates) with the reference's values."""
    sae = make_sae(16, 64, 4, torch.float64)
    generator = torch.Generator().manual_seed(8)
    x1, x2 = (torch.randn(32, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    dead = random_dead(64, 0.25)
    sparse_step(sae, x1, dead, 8, 0.5, products=products)
    first = {name: getattr(sae, name).grad for name in PARAMETERS}
    sparse_step(sae, x2, dead, 8, 0.5, products=products)
    grads = {name: getattr(sae, name).grad for name in PARAMETERS}
    assert all(grads[name] is first[name] for name in ("W_enc", "b_enc", "W_dec"))
    _, expected = run(dense_reference_step, sae, x2, dead, 8, 0.5)
    for name in PARAMETERS:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("d, n, k, dead_fraction, k_aux", [CASES[1], CASES[4], CASES[6]])
def test_multitopk_wide_selection(products, d, n, k, dead_fraction, k_aux):
    """Multi-TopK's wide selection (k_w = 4k, weight 1/8) beside the top-k and AuxK: its loss
    and its share of every gradient are the reference's, with either product path."""
    sae = make_sae(d, n, k, torch.float64)
    x = torch.randn(40, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    wide = Wide(min(n - 1, 4 * k), 1 / 8)
    out = assert_same_step(sae, x, random_dead(n, dead_fraction), k_aux, 0.5, rtol=1e-10, atol=1e-12,
                           project=True, products=products, wide=wide)
    assert out.wide_loss > 0


def test_products_default_by_device_and_refuse_others(monkeypatch):
    """CPU tensors take the CSR path unless another is asked for; an unknown name is refused."""
    called = []
    monkeypatch.setattr(kernels, "gather_step", lambda *args: called.append("gather") or None)
    monkeypatch.setattr(kernels, "_sparse_step", lambda *args: called.append("csr") or None)
    sae, x = make_sae(16, 64, 4, torch.float32), torch.randn(8, 16)
    sparse_step(sae, x, None, 0, 0.0)
    sparse_step(sae, x, None, 0, 0.0, products="gather")
    assert called == ["csr", "gather"]
    with pytest.raises(ValueError, match="products must be one of"):
        sparse_step(sae, x, None, 0, 0.0, products="cusparse")


class LargestAllocation(TorchDispatchMode):
    """Records the number of elements of the largest strided tensor any aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_dense_batch_by_latent_tensor(monkeypatch):
    """With the encoder in blocks of B/4 rows, no op of sparse_step creates a strided tensor
    of more than B/4 · n elements: no dense (B, n) activations, gradient or decoder product.
    Dense AuxK codes (B, dead) appear only for a selection of ≥ 1/4 of the dead latents.
    No autograd graph is built and x gets no gradient."""
    batch, d, n, k = 64, 16, 512, 8
    monkeypatch.setattr(kernels, "_BLOCK_ROWS", batch // 4)
    sae = make_sae(d, n, k, torch.float32)
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(7)).requires_grad_()
    dead = random_dead(n, 0.5)
    with LargestAllocation() as reference_probe:  # the probe does see dense (B, n) tensors
        dense_reference_step(sae, x.detach(), dead, 64, 0.5)
    assert reference_probe.largest >= batch * n
    with LargestAllocation() as probe:
        out = sparse_step(sae, x, dead, 16, 0.5)  # 16 of ~256 dead latents: a sparse AuxK selection
    assert probe.largest <= batch // 4 * n
    with LargestAllocation() as dense_aux_probe:  # 64 of them: dense AuxK codes (B, dead) ≤ (B, 4 · 64)
        sparse_step(sae, x.detach(), dead, 64, 0.5)
    assert batch // 4 * n < dense_aux_probe.largest <= batch * 64 / kernels._DENSE_AUX_FRACTION
    assert x.grad is None
    assert not any(t.requires_grad for t in (out.loss, out.mse_loss, out.aux_loss, out.values))
    assert all(getattr(sae, name).grad.grad_fn is None for name in PARAMETERS)
