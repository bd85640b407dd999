import math

import pytest
import torch
from torch.nn import functional as F

from saesweep.evaluation import metrics as M
from saesweep.evaluation import probes as P
from saesweep.sae.topk import TopKSAE


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_fvu_is_around_the_mean_not_zero():
    g = _gen()
    x = torch.randn(256, 8, generator=g) + 10.0  # large offset: variance ≪ E‖x‖²
    x_hat = x.mean(dim=0).expand_as(x)
    assert M.fvu(x, x_hat) == pytest.approx(1.0)
    assert M.fvu(x, x) == 0.0
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    expected = ((noisy - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert M.fvu(x, noisy) == pytest.approx(expected.item(), rel=1e-5)
    assert math.isnan(M.fvu(torch.ones(4, 3), torch.zeros(4, 3)))


def test_accumulator_matches_batch_functions_on_concatenation():
    g = _gen(1)
    sae = TopKSAE(16, 64, {"k": 4})
    sae.initialise(torch.randn(128, 16, generator=g), g)
    xs = [torch.randn(b, 16, generator=g) * 3 + 5 for b in (7, 50, 1, 33)]
    acc = M.ReconstructionAccumulator(n_latents=64)
    all_x, all_hat, all_idx, all_val = [], [], [], []
    with torch.no_grad():
        for x in xs:
            idx, val = sae.select(sae.pre_activations(x))
            x_hat = sae.decode(sae.encode(x))
            acc.update(x, x_hat, idx, val)
            all_x.append(x), all_hat.append(x_hat), all_idx.append(idx), all_val.append(val)
    x, x_hat = torch.cat(all_x), torch.cat(all_hat)
    idx, val = torch.cat(all_idx), torch.cat(all_val)
    res = acc.result()
    assert res["n_tokens"] == x.shape[0]
    assert res["normalised_mse"] == pytest.approx(M.fvu(x, x_hat), rel=1e-9)
    assert res["mse"] == pytest.approx(F.mse_loss(x_hat, x).item(), rel=1e-5)
    assert res["cosine_similarity"] == pytest.approx(M.cosine_similarity(x, x_hat), rel=1e-9)
    assert res["l0"] == pytest.approx(M.l0(val))
    counts = M.fired_counts(val, idx, 64)
    assert torch.equal(acc.counts, counts)
    assert res["dead_fraction"] == pytest.approx(M.dead_fraction(counts))
    hist = acc.histogram(bins=10)
    assert int(hist.counts.sum()) + hist.n_dead == 64


def test_l0_dead_and_fired_counts_dense_and_sparse_agree():
    dense = torch.tensor([[0.0, 2.0, 0.0, 5e-4], [1.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    idx = torch.tensor([[1, 3], [0, 2], [0, 1]])
    val = torch.tensor([[2.0, 5e-4], [1.0, 0.0], [0.5, 0.0]])
    assert M.l0(dense) == pytest.approx(4 / 3) == M.l0(val)
    assert M.fired_counts(dense).tolist() == [2, 1, 0, 0]  # 5e-4 ≤ threshold 1e-3
    assert torch.equal(M.fired_counts(val, idx, 4), M.fired_counts(dense))
    assert M.dead_fraction(M.fired_counts(dense)) == 0.5
    acc = M.ReconstructionAccumulator()
    acc.update(torch.randn(3, 2), torch.randn(3, 2), values=dense)
    assert acc.result()["dead_fraction"] == 0.5


def test_firing_histogram_bins_live_latents():
    counts = torch.tensor([0, 1, 10, 100, 1000, 0])
    hist = M.firing_histogram(counts, n_tokens=1000, bins=3)  # edges −3, −2, −1, 0
    assert hist.edges.tolist() == pytest.approx([-3, -2, -1, 0])
    assert hist.counts.tolist() == [1, 1, 2]
    assert hist.n_dead == 2


def test_cosine_similarity():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert M.cosine_similarity(x, torch.tensor([[2.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)


def test_downstream_scores_and_degenerate_denominators():
    assert M.ce_loss_recovered(3.0, 3.0, 7.0) == 1.0
    assert M.ce_loss_recovered(3.0, 7.0, 7.0) == 0.0
    assert M.ce_loss_recovered(3.0, 4.0, 7.0) == pytest.approx(0.75)
    assert math.isnan(M.ce_loss_recovered(3.0, 3.5, 3.0))
    assert M.kl_score(0.5, 2.0) == pytest.approx(0.75)
    assert math.isnan(M.kl_score(0.5, 0.0))


def test_next_token_ce_and_kl():
    g = _gen(2)
    logits = torch.randn(2, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
    assert M.next_token_ce(logits, tokens) == pytest.approx(ref.item(), rel=1e-5)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = True
    mask[1, 4] = True  # the last position has no target and does not count
    one = F.cross_entropy(logits[0, 1:2], tokens[0, 2:3])
    assert M.next_token_ce(logits, tokens, mask) == pytest.approx(one.item(), rel=1e-5)
    assert M.next_token_ce_sum(logits, tokens, mask)[1] == 1
    assert math.isnan(M.next_token_ce(logits, tokens, torch.zeros(2, 5, dtype=torch.bool)))

    other = torch.randn(2, 5, 11, generator=g)
    kl = F.kl_div(F.log_softmax(other, -1), F.log_softmax(logits, -1), log_target=True, reduction="none").sum(-1)
    assert M.next_token_kl(logits, other) == pytest.approx(kl.mean().item(), rel=1e-5)
    assert M.next_token_kl(logits, other, mask) == pytest.approx(kl[mask].mean().item(), rel=1e-5)
    assert M.next_token_kl(logits, logits) == pytest.approx(0.0, abs=1e-6)


def test_ablation_sparsity_ignores_a_shift_of_all_logits():
    """Adding one constant to every logit of a position changes no probability: the median
    subtraction removes it, so a shift alone scores nan and a shift plus one moved logit
    scores like the moved logit alone."""
    T, V = 3, 50
    shift = torch.arange(T, dtype=torch.float64)[:, None].expand(T, V).clone()
    assert math.isnan(M.ablation_sparsity(shift))
    one = torch.zeros(T, V, dtype=torch.float64)
    one[1, 7] = 2.0
    assert M.ablation_sparsity(shift + one) == pytest.approx(M.ablation_sparsity(one))


def test_standard_error_shrinks_as_more_are_sampled():
    mean, se = M.mean_and_standard_error([1.0, 3.0, float("nan")])
    assert mean == 2.0 and se == pytest.approx(math.sqrt(2.0) / math.sqrt(2))
    assert math.isnan(M.mean_and_standard_error([1.0])[1]) and math.isnan(M.mean_and_standard_error([])[0])
    g = _gen(3)
    draws = torch.rand(4096, generator=g).tolist()
    errors = [M.mean_and_standard_error(draws[:m])[1] for m in (16, 256, 4096)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] == pytest.approx(math.sqrt(1 / 12 / 4096), rel=0.1)  # uniform: σ² = 1/12


def test_ablation_sparsity_range():
    T, V = 4, 11
    one = torch.zeros(T, V)
    one[2, 3] = -5.0
    assert M.ablation_sparsity(one) == pytest.approx(1 / (T * V))
    alike = torch.full((T, V), 0.3)
    alike[:, : V // 2] = -0.3
    alike[:, V // 2] = 0.0  # the median: every other logit moves by the same amount
    assert M.ablation_sparsity(alike) == pytest.approx((V - 1) / V)
    dense = torch.randn(T, V, generator=_gen(3))
    assert 1 / (T * V) < M.ablation_sparsity(dense) < 1.0
    assert math.isnan(M.ablation_sparsity(torch.zeros(T, V)))


def test_label_entropy():
    assert P.label_entropy(torch.tensor([True, False])) == pytest.approx(math.log(2))
    assert P.label_entropy(torch.tensor([True, True])) == 0.0
    p = 0.25
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert P.label_entropy(torch.tensor([True, False, False, False])) == pytest.approx(h)


def _latents(T, m, seed):
    g = _gen(seed)
    values = torch.rand(T, m, generator=g) * (torch.rand(T, m, generator=g) < 0.2)
    return values, g


def test_probe_finds_the_latent_that_encodes_the_task():
    values, g = _latents(1000, 150, 4)
    labels = torch.rand(1000, generator=g) < 0.3
    values[:, 123] = labels.float() * (1.0 + torch.rand(1000, generator=g))  # fires iff label
    loss, j = P.best_latent_probe_loss(values, labels)
    assert j == 123
    assert loss < 0.02
    # inverted encoding (latent off on positives) is found as well
    values[:, 123] = (~labels).float() * 2.0
    loss, j = P.best_latent_probe_loss(values, labels)
    assert j == 123 and loss < 0.02


def test_probe_on_random_labels_is_near_label_entropy():
    values, g = _latents(3000, 60, 5)
    labels = torch.rand(3000, generator=g) < 0.3
    loss, _ = P.best_latent_probe_loss(values, labels)
    h = P.label_entropy(labels[1500:])
    assert h - 0.02 < loss < h + 0.01
    losses = P.probe_losses(values, labels).test
    assert losses.shape == (60,) and bool((losses > h - 0.02).all())


def test_probe_latent_is_chosen_on_the_training_half():
    """With labels no latent predicts, the smallest held-out loss of 300 latents lies below
    the label entropy (chosen on the data it is measured on: optimistic); the latent chosen by
    its training loss reports its own held-out loss, which does not."""
    values, g = _latents(2000, 300, 0)
    labels = torch.rand(2000, generator=g) < 0.4
    losses = P.probe_losses(values, labels)
    h = P.label_entropy(labels[1000:])
    loss, j = P.best_latent_probe_loss(values, labels)
    assert j == int(losses.train.argmin()) and loss == losses.test[j].item()
    assert losses.test.min().item() < h < loss


def test_probe_constant_latents_and_chunking():
    values, g = _latents(600, 40, 6)
    values[:, :5] = 0.0  # dead latents: the probe is the training base rate
    labels = torch.rand(600, generator=g) < 0.5
    full = P.probe_losses(values, labels).test
    chunked = P.probe_losses(values, labels, chunk_elements=300 * 7).test  # 7 columns per chunk
    assert torch.allclose(full, chunked)
    p = labels[:300].double().mean()
    y = labels[300:].double()
    base_loss = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert full[:5] == pytest.approx([base_loss.item()] * 5, rel=1e-6)
    with pytest.raises(ValueError):
        P.probe_losses(values, labels, train_fraction=0.0)


# ----------------------------------------------------------------------------------
# A second device: fake CUDA tensors (no GPU needed). An op mixing devices raises
# FakeTensorDeviceMismatchError, so every tensor a function makes must follow its inputs'.


def _fake_cuda():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _entries(T: int, n: int, per_row: int, device: str):
    """Code entries (rows, cols, values), ``per_row`` per row, on ``device``."""
    rows = torch.arange(T, device=device).repeat_interleave(per_row)
    cols = torch.randint(0, n, (T * per_row,), device=device)
    return rows, cols, torch.rand(T * per_row, device=device)


def test_streamed_pieces_stay_on_a_second_device():
    from saesweep.evaluation.analysis import CodeChunk, ColumnGather, count_firing

    T, n, d, k = 12, 40, 8, 3
    with _fake_cuda():
        x = torch.randn(T, d, device="cuda")
        indices = torch.randint(0, n, (T, k), device="cuda")
        values = torch.rand(T, k, device="cuda")
        assert M.fired_counts(values, indices, n).device.type == "cuda"
        assert M.fired_counts(torch.rand(T, n, device="cuda")).device.type == "cuda"
        acc = M.ReconstructionAccumulator(n_latents=n)
        for part, part_indices, part_values in zip(x.split(6), indices.split(6), values.split(6)):  # slicing a fake tensor fails
            acc.update(part, part * 0.5, part_indices, part_values)
        assert {t.device.type for t in (acc.mean, acc.m2, acc.sq_error, acc.cos_sum, acc.l0_sum, acc.counts)} == {"cuda"}

        labels = torch.rand(4, T, device="cuda") < 0.5
        screen = P.CorrelationScreen(labels, T // 2, n)
        chunk = CodeChunk(*_entries(T, n, k, "cuda"))
        screen.update(0, torch.rand(T, n, device="cuda"))
        assert screen.correlation().device.type == "cuda" and screen.candidates(5).shape == (4, 5)
        assert screen.candidates(5).device.type == "cuda"
        counts = torch.zeros(n, dtype=torch.int64, device="cuda")
        count_firing(counts, chunk, T // 2)
        gather = ColumnGather(torch.tensor([1, 7, 30], device="cuda"), n, T)
        gather.update(chunk)
        assert gather.columns().shape == (T, 3) and gather.columns().device.type == "cuda"


def test_a_tensor_left_on_the_cpu_is_caught():
    """The check above can fail: latent values on the CPU against labels on the device raise."""
    with _fake_cuda():
        screen = P.CorrelationScreen(torch.rand(4, 12, device="cuda") < 0.5, 6, 40)
        with pytest.raises(RuntimeError, match="same device"):
            screen.update(0, torch.rand(12, 40))


def test_correlation_screen_equals_centred_columns():
    """|corr| from the streamed sums equals the correlation of centred dense columns on the
    first N rows, whatever the chunks; rows past N are ignored (the chunk across N too)."""
    T, n, N = 50, 30, 31
    g = _gen(7)
    dense = torch.rand(T, n, generator=g) * (torch.rand(T, n, generator=g) < 0.2)
    dense[:, 3] = 0.0  # a dead latent scores 0
    labels = torch.rand(2, T, generator=g) < 0.4
    screen = P.CorrelationScreen(labels, N, n)
    for start in range(0, T, 7):
        screen.update(start, dense[start : start + 7])
    values = dense[:N].double() - dense[:N].double().mean(dim=0)
    for task in range(2):
        y = labels[task, :N].double() - labels[task, :N].double().mean()
        expected = (values.T @ y).abs() / (values.norm(dim=0) * y.norm()).clamp_min(1e-12)
        assert torch.allclose(screen.correlation()[task], expected, atol=1e-12)
        assert screen.candidates(4)[task].tolist() == expected.topk(4).indices.tolist()
    assert screen.correlation()[:, 3].eq(0).all()
