"""FLOPs of one training step per architecture (``sae.flops``): hand-computed counts, the
products torch's FLOP counter sees in the steps that run dense products, and the way
TopK's count scales."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from saesweep.sae.base import StepContext
from saesweep.sae.flops import RULES, encoder, step_flops
from saesweep.sae.registry import ARCHITECTURES, build_sae, resolve_params

B, D, N = 64, 16, 128
E = 2 * B * D * N  # 262,144: the encoder product
P = 2 * N * D  # 4,096: ∂b_pre's encoder path


def params(arch: str, **values) -> dict:
    return resolve_params(arch, values, "test")


def test_every_architecture_has_a_count() -> None:
    assert set(RULES) == set(ARCHITECTURES)


@pytest.mark.parametrize(("arch", "values", "support", "aux", "expected"), [
    ("topk", {"k": 4}, None, 0, E + P + 8 * D * B * 4),  # 299,008
    ("topk", {"k": 4}, None, 8, E + P + 8 * D * B * 12),  # AuxK's 8 entries per token
    ("multitopk", {"k": 4}, None, 0, E + P + 8 * D * B * (4 + 16)),  # k_w = 4·4
    ("batchtopk", {"k": 4}, 256, 0, E + P + 8 * D * 256),
    ("relu", {"l1_coef": 0.1}, 1000, 0, E + P + 8 * D * 1000),  # 394,240
    ("jumprelu", {"l0_coef": 0.1}, 1000, 0, 394_240),
    ("gated", {"l1_coef": 0.1}, 1000, 0, E + P + 12 * D * 1000),  # 458,240
    ("matryoshka", {"k": 4}, None, 0, 12 * B * D * N),  # 1,572,864
    ("matryoshkatopk", {"k": 4}, None, 3, 18 * B * D * N),  # dense AuxK while latents are dead
])
def test_hand_computed_counts(arch, values, support, aux, expected) -> None:
    assert step_flops(arch, B, D, N, params(arch, **values), support, aux) == expected


def test_topk_decode_grows_with_k_not_n() -> None:
    """Beyond the dense encoder, TopK's step costs 8·d per selected entry: the same at every n,
    and linear in k (a dense decode would grow with n)."""
    def beyond_encoder(n: int, k: int) -> int:
        return step_flops("topk", B, D, n, params("topk", k=k)) - encoder(B, D, n)

    assert beyond_encoder(128, 4) == beyond_encoder(4096, 4) == 8 * D * B * 4
    assert beyond_encoder(128, 8) == 2 * beyond_encoder(128, 4)


def test_a_support_step_needs_its_support() -> None:
    with pytest.raises(ValueError, match="support size"):
        step_flops("relu", B, D, N, params("relu", l1_coef=0.1))


def counted_step(arch: str, values: dict, dead: int) -> tuple[int, int]:
    """(torch's count of the dense products of one training step, ``step_flops`` of it) at
    initialisation, with ``dead`` latents dead and AuxK on (k_aux 8) when there are any."""
    sae = build_sae(arch, D, N, params(arch, **values))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=generator)
    sae.initialise(x, generator)
    dead_mask = torch.arange(N) < dead if dead else None
    context = StepContext(dead_mask=dead_mask, k_aux=8 if dead else 0, aux_coef=1.0 if dead else 0.0,
                          progress=0.5, fire_threshold=0.0)
    with FlopCounterMode(display=False) as counter:
        out = sae.training_step(x, context)
    return counter.get_total_flops(), step_flops(arch, B, D, N, sae.params, out.entries, min(8, dead))


@pytest.mark.parametrize(("arch", "values", "dead"), [
    ("matryoshka", {"k": 4}, 0), ("matryoshka", {"k": 4}, 64), ("matryoshkatopk", {"k": 4}, 0),
    ("matryoshkatopk", {"k": 4}, 64),
    # at initialisation half of ReLU's pre-activations are positive: the support runs densely
    ("relu", {"l1_coef": 0.1}, 0), ("jumprelu", {"l0_coef": 0.1}, 0), ("gated", {"l1_coef": 0.1}, 0),
])
def test_dense_steps_count_what_torch_counts(arch, values, dead) -> None:
    counted, stated = counted_step(arch, values, dead)
    assert counted == stated


@pytest.mark.parametrize(("arch", "values"), [("topk", {"k": 4}), ("multitopk", {"k": 4}), ("batchtopk", {"k": 4})])
def test_sparse_steps_run_one_dense_product(arch, values) -> None:
    """torch counts only the dense products of a sparse step: the encoder and ∂b_pre's path."""
    counted, stated = counted_step(arch, values, 0)
    assert counted == E + P < stated
