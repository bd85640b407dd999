"""Which of a pure law and its law with floor the cells support: leave-one-out prediction error.

AICc, used before, is decided by its penalty at m = 5 cells (2p(p + 1)/(m − p − 1) is 24 for
the law with floor and 6 for the pure law), so a floor won only if its RSS was below about
1.8 % of the pure law's. Instead each law is refitted m times, once without each cell i, and
predicts that cell:

    LOO = (1/m) Σ_i (log L̂_{−i}(x_i) − log y_i)²

(``loo_mse`` of a law entry; it needs p + 1 distinct x without any one cell, i.e. m ≥ p + 2).
With R = LOO(pure) / LOO(floor), the floor is preferred when R > LOO_RATIO, the pure law when
R < 1/LOO_RATIO, and otherwise "the data cannot tell" (the law with the lower LOO is still
named ``better``, and is the one a figure draws). The rates at which this picks the planted
law, the other one, or neither, at m = 5, 6 and 8 cells and the default sweep's noise, are
measured by ``python -m saesweep.analysis.calibrate`` (benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np

from saesweep.analysis.fitting import Fit, fit_law, too_few
from saesweep.analysis.laws import design, log_predict

LOO_RATIO = 2.0
"""How many times smaller one law's leave-one-out error must be for the data to prefer it."""
CANNOT_TELL = "the data cannot tell"


def loo_mse(fit: Fit) -> float | str:
    """The leave-one-out mean squared log prediction error of ``fit``'s law on its cells (module
    docstring), each refit started from ``fitting.initial_points`` and the full-data optimum; a reason string where some
    cell cannot be left out."""
    reason = too_few(fit.law, fit.nk, spare=1)
    if reason:
        return f"leave-one-out: {reason}"
    errors = []
    for i in range(len(fit.y)):
        keep = np.arange(len(fit.y)) != i
        part = fit_law(fit.law, fit.nk[keep], fit.y[keep], warm=fit.theta)
        if isinstance(part, str):
            return f"leave-one-out without cell {i}: {part}"
        log_l = log_predict(part.theta, *design(fit.law, fit.nk[i : i + 1, 0], fit.nk[i : i + 1, 1]))[0][0]
        errors.append((log_l - np.log(fit.y[i])) ** 2)
    return float(np.mean(errors))


def verdict(power: float, floor: float) -> tuple[str | None, str]:
    """(preferred form or None, verdict in words) from the two laws' LOO errors (module docstring)."""
    if power > LOO_RATIO * floor:
        return "floor", "floor"
    if floor > LOO_RATIO * power:
        return "power", "power"
    return None, CANNOT_TELL


def compare(power: dict, floor: dict) -> dict:
    """The comparison record of a pure law and its law with floor fitted to the same cells::

        {"criterion": "leave-one-out", "threshold": LOO_RATIO,
         "loo_mse": {"power", "floor"}, "ratio": LOO(power)/LOO(floor),
         "better": form with the lower LOO, "preferred": "power" | "floor" | None,
         "verdict": "power" | "floor" | "the data cannot tell"}

    or, where a LOO error is missing, the same with ratio, better, preferred and verdict None
    and a "reason"."""
    out: dict = {
        "criterion": "leave-one-out",
        "threshold": LOO_RATIO,
        "loo_mse": {"power": power.get("loo_mse"), "floor": floor.get("loo_mse")},
    }
    missing = [
        f"{e['law']} skipped" if e["status"] == "skipped" else f"{e['law']}: {e['loo_reason']}"
        for e in (power, floor)
        if e.get("loo_mse") is None
    ]
    if missing:
        return out | {"ratio": None, "better": None, "preferred": None, "verdict": None, "reason": "; ".join(missing)}
    loo_p, loo_f = power["loo_mse"], floor["loo_mse"]
    preferred, words = verdict(loo_p, loo_f)
    ratio = loo_p / loo_f if loo_f > 0 else float("inf")
    return out | {
        "ratio": ratio if np.isfinite(ratio) else None,
        "better": "floor" if loo_f < loo_p else "power",
        "preferred": preferred,
        "verdict": words,
    }
