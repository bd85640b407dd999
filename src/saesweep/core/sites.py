"""Hook-site names: ``resid{L}``, ``mlp{L}``, ``attn{L}`` for block L (from 0), and the
TransformerLens hook name of each (what SAELens records as ``hook_name``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from saesweep.core.errors import UserError

SITE_PATTERN = re.compile(r"^(?P<kind>resid|mlp|attn)(?P<layer>[0-9]+)$")


@dataclass(frozen=True)
class Site:
    """A hook site: ``resid``/``mlp``/``attn`` output of block ``layer`` (from 0)."""

    kind: str
    layer: int


def parse_site(name: str) -> Site:
    """``resid8`` → Site("resid", 8); an unknown name lists the valid forms."""
    match = SITE_PATTERN.match(name)
    if match is None:
        raise UserError(
            f"site {name!r} is not a valid site name; use resid{{L}} (residual stream after "
            "block L), mlp{L} (MLP output of block L) or attn{L} (attention output of block L)"
        )
    return Site(match["kind"], int(match["layer"]))


TRANSFORMER_LENS_HOOKS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


def transformer_lens_hook(name: str) -> str:
    """``resid8`` → ``blocks.8.hook_resid_post`` (the output of block 8), ``mlp8`` →
    ``blocks.8.hook_mlp_out``, ``attn8`` → ``blocks.8.hook_attn_out``."""
    site = parse_site(name)
    return f"blocks.{site.layer}.{TRANSFORMER_LENS_HOOKS[site.kind]}"
