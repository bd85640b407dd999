"""Evaluation on a second device, proven on a CPU-only torch.

The second device is ``meta``: tensors with shapes and no data, and an elementwise op that
mixes a meta and a CPU tensor raises, as one mixing CUDA and CPU tensors does on a GPU. (A fake
``cuda:0`` under ``FakeTensorMode`` cannot serve here: indexing a tensor or copying into one
initialises CUDA, which a CPU-only torch refuses; a transformers LM cannot run on either, its
mask code reads values.) The LM is a small torch-only causal LM with transformers' hook points
(``model.layers``). The tests read a cell through evaluation's own loader and run the spliced
forward, where the SAE meets the LM's activations on the LM's device.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import CPU
from saesweep.core.job_settings import EvalSettings, from_json
from saesweep.data.activations import shard_name, write_manifest, write_shard
from saesweep.evaluation import evaluate
from saesweep.evaluation.evaluate import load_inputs, reconstructor, spliced_logits
from saesweep.sae.export import load_sae, save_sae
from saesweep.sae.registry import build_sae, resolve_params

SECOND = torch.device("meta")  # the second device (see the module docstring)
D, N, VOCAB, CONTEXT, SKIP = 16, 48, 40, 8, 1


class Block(nn.Module):
    """A causal residual block: h ↦ h + running mean over positions of tanh(h A + b)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, D)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device).unsqueeze(-1)
        return hidden + torch.tanh(self.linear(hidden)).cumsum(dim=1) / positions


class TorchOnlyLM(nn.Module):
    """A causal LM of torch ops only: embedding, residual blocks at ``model.layers`` (where
    ``lm.site_module`` finds ``resid{L}``), an unembedding; ``.logits`` as transformers'."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(D, VOCAB)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        hidden = self.embed(input_ids)
        for block in self.model.layers:
            hidden = block(hidden)
        return SimpleNamespace(logits=self.head(hidden))


@pytest.fixture()
def cell(tmp_path: Path) -> tuple[Path, EvalSettings]:
    """A TopK cell folder and the settings of its evaluation on written held-out shards."""
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, VOCAB, (6, CONTEXT), generator=generator).numpy().astype(np.int32)
    activations = torch.randn(6 * (CONTEXT - SKIP), D, generator=generator).numpy()
    folder = tmp_path / "eval"
    folder.mkdir()
    attributes = {"model": "torch-only", "revision": "", "compute_dtype": "float32", "storage_dtype": "float32",
                  "context": CONTEXT, "skip_positions": SKIP, "corpus_fingerprint": "test", "code_version": "0",
                  "settings_hash": "0", "site": "resid1"}
    write_shard(folder / shard_name(0), activations, torch.from_numpy(windows), attributes)
    write_manifest(folder, 1, attributes, {})
    params = resolve_params("topk", {"k": 4}, "test")
    sae = build_sae("topk", D, N, params)
    sae.initialise(torch.from_numpy(activations), generator)
    save_sae(sae, tmp_path / "cell", {"arch": "topk", "params": params, "d": D, "n_latents": N, "seed": 0, "site": "resid1"})
    settings = from_json(EvalSettings, {
        "tokens": 24, "downstream_windows": 4, "analysis_windows": 4, "explain_latents": 4, "ablation_tokens": 2, "ablation_latents": 0, "refine_tokens": 16,
        "ablation_windows": 2, "lm_batch_size": 2, "probe_candidates": 4, "k_transfer_factors": [1], "batch_size": 16,
        "site": "resid1", "cell": "topk-n48-k4-s0", "setting": "topk-k4", "seed": 0,
        "model": {"id": "torch-only", "revision": None, "pypi_gguf": None, "dtype": "float32", "prepend_bos": False,
                  "hidden_size": None},
        "eval_activations": str(folder), "device": "cuda",
    }, "test settings")
    return tmp_path / "cell", settings


def torch_only_lm(_model, device: torch.device) -> tuple[nn.Module, None]:
    """``load_lm``'s contract with the torch-only LM: on ``device``, no gradients."""
    return TorchOnlyLM().requires_grad_(False).to(device), None


def spliced_forward_on(device: torch.device, cell_folder: Path, settings: EvalSettings) -> torch.Tensor:
    """Evaluation's inputs read onto ``device`` by its own loader, then the LM's logits with
    the SAE's reconstruction spliced in at the site, as the downstream metrics compute them."""
    inputs = load_inputs(settings, cell_folder, device)
    return spliced_logits(inputs.lm, settings.site, inputs.windows[:2], SKIP, reconstructor(inputs.sae))


def test_evaluation_reads_everything_onto_its_device(cell, monkeypatch) -> None:
    cell_folder, settings = cell
    monkeypatch.setattr(evaluate, "load_lm", torch_only_lm)
    with torch.no_grad():
        inputs = load_inputs(settings, cell_folder, SECOND)
        tensors = {"activations": inputs.activations, "windows": inputs.windows,
                   **dict(inputs.sae.named_parameters()), **dict(inputs.sae.named_buffers()),
                   **{f"lm.{name}": value for name, value in inputs.lm.named_parameters()}}
        assert {name: tensor.device for name, tensor in tensors.items()} == {name: SECOND for name in tensors}
        logits = spliced_forward_on(SECOND, cell_folder, settings)
        assert logits.device == SECOND and logits.shape == (2, CONTEXT, VOCAB)
        x = inputs.sae.normalise(inputs.activations)
        assert inputs.sae(x).device == SECOND


def test_an_sae_left_on_the_cpu_meets_the_lm_on_the_gpu_and_fails(cell, monkeypatch) -> None:
    """What this test file guards against: ``load_sae(cell_folder)`` onto the CPU in
    evaluation while the LM is on the GPU. On a CPU run the two agree, so only a second
    device shows it."""
    cell_folder, settings = cell
    monkeypatch.setattr(evaluate, "load_lm", torch_only_lm)
    monkeypatch.setattr(evaluate, "load_sae", lambda folder, _device: load_sae(folder, CPU))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="device"):
            spliced_forward_on(SECOND, cell_folder, settings)


def test_the_spliced_forward_on_the_cpu_equals_the_reconstruction_spliced_by_hand(cell, monkeypatch) -> None:
    """The same loader and splice on the CPU with real data: the logits are those of the LM
    whose block-1 output is replaced, at kept positions, by the SAE's reconstruction (and
    differ from the clean LM's, so the splice took place)."""
    cell_folder, settings = cell
    monkeypatch.setattr(evaluate, "load_lm", torch_only_lm)
    with torch.no_grad():
        logits = spliced_forward_on(CPU, cell_folder, settings)
        inputs = load_inputs(settings, cell_folder, CPU)
        lm, ids = inputs.lm, inputs.windows[:2]
        hidden = lm.embed(ids)
        for index, block in enumerate(lm.model.layers):
            hidden = block(hidden)
            if index == 1:
                hidden = hidden.clone()
                hidden[:, SKIP:] = reconstructor(inputs.sae)(hidden[:, SKIP:])
        torch.testing.assert_close(logits, lm.head(hidden))
        assert not torch.allclose(logits, lm(ids).logits, atol=1e-3)
