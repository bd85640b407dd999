"""The language model: loading, naming hook sites, a forward that stops at the deepest
site, and splicing a replacement into a site's output.

Sites: ``resid{L}`` is the output of decoder block L (the residual stream after the
block, which equals ``hidden_states[L + 1]`` of transformers for every block but the
last); ``mlp{L}`` and ``attn{L}`` are the outputs of block L's MLP and attention
modules. Blocks count from 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from saesweep.core.sites import parse_site
from saesweep.core.errors import UserError
from saesweep.core.job_settings import ModelSettings

BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
ATTENTION_NAMES = ("self_attn", "attn", "attention")
MLP_NAMES = ("mlp",)
FINAL_NORM_PATHS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_lm(model: ModelSettings, device: torch.device) -> tuple[nn.Module, Any]:
    """(causal LM in eval mode on ``device``, in the model's configured dtype; tokenizer) from a
    hub id or a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = {"revision": model.revision} if model.revision else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.id, **options)
        lm = AutoModelForCausalLM.from_pretrained(model.id, dtype=DTYPES[model.dtype], **options)
    except OSError as error:
        raise UserError(f"config key model.id: cannot load {model.id!r} ({error})") from None
    return lm.to(device).eval().requires_grad_(False), tokenizer


def decoder_blocks(lm: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks, found at one of the usual attribute paths."""
    for path in BLOCK_PATHS:
        module: Any = lm
        for attribute in path.split("."):
            module = getattr(module, attribute, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise UserError(f"cannot find the decoder blocks of {type(lm).__name__} (looked at {', '.join(BLOCK_PATHS)})")


def site_module(lm: nn.Module, site: str) -> nn.Module:
    """The module whose output is the site's activation."""
    parsed = parse_site(site)
    blocks = decoder_blocks(lm)
    if parsed.layer >= len(blocks):
        raise UserError(f"site {site}: the model has blocks 0..{len(blocks) - 1}")
    block = blocks[parsed.layer]
    if parsed.kind == "resid":
        return block
    for name in MLP_NAMES if parsed.kind == "mlp" else ATTENTION_NAMES:
        if hasattr(block, name):
            return getattr(block, name)
    raise UserError(f"site {site}: block {parsed.layer} of {type(lm).__name__} has no {parsed.kind} module")


def main_output(output: Any) -> torch.Tensor:
    """The activation tensor of a module's output (the first element of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


class _ReachedDeepestSite(Exception):
    """Raised by a hook to stop the forward once every site has been captured."""


@torch.no_grad()
def capture_sites(lm: nn.Module, input_ids: torch.Tensor, sites: list[str]) -> dict[str, torch.Tensor]:
    """Activations (B, T, d) at every site, running the model only up to the block of
    the deepest site."""
    captured: dict[str, torch.Tensor] = {}
    deepest = max(parse_site(site).layer for site in sites)
    handles = []

    def keep(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[name] = main_output(output)

        return hook

    def stop(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        raise _ReachedDeepestSite

    try:
        for site in sites:
            handles.append(site_module(lm, site).register_forward_hook(keep(site)))
        handles.append(decoder_blocks(lm)[deepest].register_forward_hook(stop))
        with contextlib.suppress(_ReachedDeepestSite):
            lm(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@contextlib.contextmanager
def spliced(lm: nn.Module, site: str, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the site's output a is replaced by ``replace(a)`` in every forward."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (replace(output[0]),) + output[1:]
        return replace(output)

    handle = site_module(lm, site).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def model_depth(lm: nn.Module) -> int:
    """Number of decoder blocks."""
    return len(decoder_blocks(lm))


def unembedding(lm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_U (V, d), γ (d,)): the LM's unembedding and the scale of its final norm (found at one
    of ``FINAL_NORM_PATHS``), on the LM's device in its dtype. logits = W_U (γ ⊙ n(h) + β)
    for the last residual stream h and the norm's normalisation n (β = 0 for an RMSNorm)."""
    for path in FINAL_NORM_PATHS:
        module: Any = lm
        for attribute in path.split("."):
            module = getattr(module, attribute, None)
        if isinstance(module, nn.Module) and getattr(module, "weight", None) is not None:
            return lm.get_output_embeddings().weight, module.weight
    raise UserError(f"cannot find the final norm of {type(lm).__name__} (looked at {', '.join(FINAL_NORM_PATHS)})")
