"""Probe metrics' definitions: the linear screen that picks candidate latents for a task,
and 1-D logistic probes on them. Pure functions of tensors, one formula each.

Notation: z_j the value of latent j at a token, y_t ∈ {0, 1} the label of task t there;
the first N tokens are the probes' training split. Following Gao et al. 2024 (§4.4, "z_i is
the i-th pre-activation latent"), z is the SAE's pre-activation (``analysis`` passes it):
the value of a latent before its sparsity rule, which is never 0 where a code is.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.nn import functional as F

from saesweep.evaluation.metrics import NAN


class CorrelationScreen:
    """|corr(z_j, y_t)| of every latent j with every task t over the first N tokens,
    streamed over chunks of dense latent values (the probes' pre-activations, see
    ``analysis``). Keeps float64 sums on the labels' device: Σ_i z_ij, Σ_i z_ij² (n,) and
    Σ_i z_ij y_ti (tasks, n), and, from the labels, Σ_i y_ti and Σ_i y_ti²; then

        cov_tj = Σ z_j y_t − Σ z_j · Σ y_t / N
        var_j  = Σ z_j² − (Σ z_j)² / N,    var_t = Σ y_t² − (Σ y_t)² / N
        |corr_tj| = |cov_tj| / max(√(var_j · var_t), 1e-12)

    exactly the correlation of the centred columns (a constant latent scores 0). Memory:
    (2 + tasks) · n float64 sums, plus the labels and one chunk in float64."""

    def __init__(self, labels: torch.Tensor, rows: int, n_latents: int) -> None:
        if labels.dim() != 2 or not 0 < rows <= labels.shape[1]:
            raise ValueError(f"labels must be (tasks, T) with 0 < rows ≤ T, got {tuple(labels.shape)} and {rows}")
        device = labels.device
        self.labels, self.rows = labels, rows
        y = labels.narrow(1, 0, rows).double()
        self.sum_y, self.sum_yy = y.sum(dim=1), (y * y).sum(dim=1)
        self.sum_z = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.sum_zz = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.sum_zy = torch.zeros(labels.shape[0], n_latents, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, start: int, values: torch.Tensor) -> None:
        """Add the latent values (c, n) of tokens start … start + c − 1; tokens ≥ N are ignored."""
        z = values.narrow(0, 0, max(0, min(len(values), self.rows - start))).double()
        if len(z) == 0:
            return
        self.sum_z += z.sum(dim=0)
        self.sum_zz += (z * z).sum(dim=0)
        self.sum_zy += self.labels.narrow(1, start, len(z)).double() @ z

    def correlation(self) -> torch.Tensor:
        """|corr(z_j, y_t)|, (tasks, n) float64."""
        n = self.rows
        sum_y = self.sum_y.unsqueeze(1)
        cov = self.sum_zy - self.sum_z * sum_y / n
        var_z = (self.sum_zz - self.sum_z * self.sum_z / n).clamp_min(0)
        var_y = (self.sum_yy.unsqueeze(1) - sum_y * sum_y / n).clamp_min(0)
        return cov.abs() / (var_y * var_z).sqrt().clamp_min(1e-12)

    def candidates(self, count: int) -> torch.Tensor:
        """Per task, the ``count`` latents (at most n) of largest |corr|: (tasks, count) int64,
        most correlated first."""
        correlation = self.correlation()
        return correlation.topk(min(count, correlation.shape[1]), dim=1).indices


def label_entropy(labels: torch.Tensor) -> float:
    """H(p) = −p ln p − (1 − p) ln(1 − p), p = mean(labels): the held-out loss of the best
    constant predictor; 0 for a single class, nan for no labels."""
    if labels.numel() == 0:
        return NAN
    p = labels.double().mean().item()
    return -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0)


def _probe_objective(a: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean BCE of σ(w a + b) per column: mean_t softplus(z) − y z, z = w a + b."""
    z = a * w + b
    return (F.softplus(z) - y[:, None] * z).mean(dim=0)


class ProbeLosses(NamedTuple):
    """Per-latent probe losses (m,) on the training and the held-out split."""

    train: torch.Tensor
    test: torch.Tensor


def probe_losses(
    latent_values: torch.Tensor,
    labels: torch.Tensor,
    train_fraction: float = 0.5,
    iterations: int = 15,
    l2: float = 1e-4,
    chunk_elements: int = 1 << 24,
) -> ProbeLosses:
    """Training and held-out loss of a 1-D logistic probe on each latent: (m,) float64 each.

    Split (deterministic): the first ⌊train_fraction·T⌋ tokens train, the rest are held
    out (flatten windows in a fixed order; shuffle beforehand if the order is biased).
    Per latent j, with a = latent_values[:, j] standardised by its training mean and std
    (a constant column becomes 0), fit p = σ(w a + b) by minimising
        mean_train BCE(p, y) + (l2 / 2) w²
    with ``iterations`` Newton steps from w = 0, b = logit(mean y_train), vectorised over
    latents (each step backtracks to the best of step sizes 1, 1/2, 1/4, 1/8 so the
    objective never rises; the small l2 keeps w finite on separable data). The losses are
    mean BCE = mean_t −[y ln p + (1 − y) ln(1 − p)] over each split, in nats.
    Columns are processed in chunks of ``chunk_elements`` // T_train; runs on the device of
    ``latent_values``, returns on the CPU."""
    if latent_values.dim() != 2 or labels.shape != latent_values.shape[:1]:
        raise ValueError("latent_values must be (T, m) and labels (T,)")
    n_train = int(math.floor(train_fraction * labels.shape[0]))
    if not 0 < n_train < labels.shape[0]:
        raise ValueError(f"train_fraction={train_fraction} leaves an empty train or test split")
    device = latent_values.device
    y = labels.to(device).double()
    y_train, y_test = y[:n_train], y[n_train:]
    base = y_train.mean().clamp(1e-6, 1 - 1e-6)
    b0 = torch.log(base / (1 - base))
    steps = (1.0, 0.5, 0.25, 0.125)
    m = latent_values.shape[1]
    width = max(1, chunk_elements // max(n_train, 1))
    train_out, test_out = (torch.empty(m, dtype=torch.float64) for _ in range(2))
    for start in range(0, m, width):
        cols = latent_values[:, start : start + width].double()
        mu = cols[:n_train].mean(dim=0)
        sd = cols[:n_train].std(dim=0, correction=0)
        scale = torch.where(sd > 1e-12, 1.0 / sd.clamp_min(1e-12), torch.zeros_like(sd))
        a = (cols - mu) * scale
        a_train, a_test = a[:n_train], a[n_train:]
        c = a.shape[1]
        w = torch.zeros(c, dtype=torch.float64, device=device)
        b = b0.expand(c).clone()
        objective = _probe_objective(a_train, y_train, w, b) + 0.5 * l2 * w * w
        for _ in range(iterations):
            p = torch.sigmoid(a_train * w + b)
            r = p - y_train[:, None]
            s = p * (1 - p)
            g_w = (r * a_train).mean(dim=0) + l2 * w
            g_b = r.mean(dim=0)
            h_ww = (s * a_train * a_train).mean(dim=0) + l2
            h_wb = (s * a_train).mean(dim=0)
            h_bb = s.mean(dim=0) + 1e-12
            det = (h_ww * h_bb - h_wb * h_wb).clamp_min(1e-18)
            d_w = (h_bb * g_w - h_wb * g_b) / det
            d_b = (h_ww * g_b - h_wb * g_w) / det
            best_w, best_b, best_obj = w, b, objective
            for step in steps:
                cand_w, cand_b = w - step * d_w, b - step * d_b
                cand = _probe_objective(a_train, y_train, cand_w, cand_b) + 0.5 * l2 * cand_w * cand_w
                better = cand < best_obj
                best_w = torch.where(better, cand_w, best_w)
                best_b = torch.where(better, cand_b, best_b)
                best_obj = torch.where(better, cand, best_obj)
            w, b, objective = best_w, best_b, best_obj
        train_out[start : start + c] = _probe_objective(a_train, y_train, w, b).cpu()
        test_out[start : start + c] = _probe_objective(a_test, y_test, w, b).cpu()
    return ProbeLosses(train_out, test_out)


def best_latent_probe_loss(
    latent_values: torch.Tensor,
    labels: torch.Tensor,
    train_fraction: float = 0.5,
    iterations: int = 15,
    l2: float = 1e-4,
) -> tuple[float, int]:
    """(held-out probe loss of latent j, j) for the latent j with the lowest *training* loss,
    for a dense (T, m) matrix of latent values (all latents, or a chosen subset: j indexes
    its columns) and boolean labels (T,): the latent is chosen on the training split only, so
    the reported loss is not selected on the data it is measured on.

    Probe and split as in ``probe_losses``. A latent that encodes the task gives a loss near
    0; when no latent helps the loss is near ``label_entropy`` of the labels."""
    losses = probe_losses(latent_values, labels, train_fraction, iterations, l2)
    j = int(torch.argmin(losses.train).item())
    return losses.test[j].item(), j
