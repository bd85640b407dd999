"""Reading a cell's training checkpoints back (``train.trainer``, ``train.distributed``).

Checkpoints are written whole under a temporary name and then renamed
(``core.files.atomic_path``), so a file that cannot be read was damaged after it was
written (a full or failing disk, a hand edit): resuming refuses it, naming the file and how
to start the cell again, rather than silently training from scratch. A readable
checkpoint of the cell's settings whose SAE has other tensor shapes than the cell's (the
activations under the same folder were extracted again at another width) is ignored, as a
checkpoint of other settings is: the cell trains from the start.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from saesweep.core.errors import UserError
from saesweep.sae.export import state_problem

CHECKPOINT = "checkpoint.pt"
"""A cell's checkpoint (a distributed cell's shared state, naming its shard files)."""


def read_checkpoint(path: Path, device: torch.device, keys: tuple[str, ...]) -> dict[str, Any]:
    """The state ``torch.save``d in ``path`` (a dict with ``keys``), tensors on ``device``;
    a file that cannot be loaded, or holds something else, is a UserError naming it."""
    delete = f"delete the cell's checkpoints (rm {path.parent}/checkpoint*.pt) to train it from the start"
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} is missing (named by {path.parent / CHECKPOINT}); {delete}") from None
    except Exception as error:  # unpickling a damaged file can raise any type
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        raise UserError(
            f"checkpoint {path} cannot be read ({reason}); checkpoints are written whole, so it was damaged "
            f"after writing: {delete}"
        ) from None
    absent = [key for key in keys if not isinstance(state, dict) or key not in state]
    if absent:
        raise UserError(f"checkpoint {path} has no {', '.join(absent)}: not a saesweep checkpoint; {delete}")
    return state


def fits(path: Path, saved: Mapping[str, torch.Tensor], sae: torch.nn.Module) -> bool:
    """Whether the SAE state ``saved`` in checkpoint ``path`` has the tensor names, shapes
    and dtypes of ``sae``'s; if not, one line on stderr says why it is ignored."""
    problem = state_problem(sae.state_dict(), saved)
    if problem:
        print(f"ignoring checkpoint {path}: its SAE is not this cell's ({problem}): made from other activations",
              file=sys.stderr)
    return problem is None
