"""How the law comparison and the fits' intervals behave with 5 to 8 cells, on planted laws.

Planted tables: cell means y_i = L(n_i) · exp(σ z_i), z_i ~ N(0, 1), at n_i = 256 · 2^i for
i < m.  The laws and the noise come from the default run's TopK k = 128 NMSE quoted in issue
25 (``ISSUE_NS``, ``ISSUE_NMSE``; the default run's cells are not kept here): the law with
floor fitted to it is the planted ``floor`` truth, the pure law fitted to it the planted
``power`` truth, and σ is the floor fit's log-residual spread s = √(Σ r² / (m − p)) (2
degrees of freedom: a rough estimate, which the cell means' scatter from seeds and any lack of
fit both enter; ``sigma_scale`` multiplies it).

- ``choice_rates``: how often ``model_choice`` picks the planted form, the other one, or says
  the data cannot tell.
- ``coverage``: how often the reported 95 % interval of each parameter (``bootstrap``) holds
  the planted value, and how often the bootstrap percentile interval alone does.

``python -m saesweep.analysis.calibrate`` prints both tables (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
from functools import cache

import numpy as np

from saesweep.analysis.bootstrap import parameter_intervals, parametric_samples
from saesweep.analysis.fitting import Fit, fit_law, linearise
from saesweep.analysis.laws import LAWS, Law, design, log_predict, to_public
from saesweep.analysis.model_choice import loo_mse, verdict
from saesweep.core.stats import TAILS_PERCENT

ISSUE_NS = (256, 512, 1024, 2048, 4096)
ISSUE_NMSE = (0.248, 0.176, 0.144, 0.134, 0.134)
FIRST_N = ISSUE_NS[0]
FORMS = ("power", "floor")


def cells(m: int) -> np.ndarray:
    """The (n, k) of m planted cells: n = 256 · 2^i, i < m, at one k."""
    return np.column_stack([FIRST_N * 2 ** np.arange(m), np.ones(m, dtype=np.int64)])


def _fit(law: Law, nk: np.ndarray, y: np.ndarray) -> Fit:
    fit = fit_law(law, nk, y)
    if isinstance(fit, str):
        raise ValueError(f"{law.name} on planted cells: {fit}")
    return fit


@cache
def planting() -> tuple[dict[str, np.ndarray], float]:
    """({form: internal θ of the planted law}, σ) from the issue's table (module docstring)."""
    nk = np.column_stack([ISSUE_NS, np.ones(len(ISSUE_NS), dtype=np.int64)])
    y = np.array(ISSUE_NMSE)
    fits = {form: _fit(LAWS[f"{form}_n"], nk, y) for form in FORMS}
    floor = fits["floor"]
    sigma = float(np.sqrt((floor.residuals**2).sum() / (len(y) - len(floor.theta))))
    return {form: fit.theta for form, fit in fits.items()}, sigma


def planted_table(form: str, m: int, rng: np.random.Generator, sigma_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(nk, y) of one planted table of the ``form`` truth at m cells."""
    thetas, sigma = planting()
    nk = cells(m)
    log_l = log_predict(thetas[form], *design(LAWS[f"{form}_n"], nk[:, 0], nk[:, 1]))[0]
    return nk, np.exp(log_l + sigma_scale * sigma * rng.standard_normal(m))


def choice_rates(form: str, m: int, tables: int, seed: int, sigma_scale: float = 1.0) -> dict[str, float]:
    """Fractions of ``tables`` planted ``form`` tables at m cells for which the comparison says
    ``right`` (the planted form), ``wrong`` (the other form) or ``cannot_tell``."""
    rng = np.random.default_rng([seed, m, FORMS.index(form)])
    counts = {"right": 0, "wrong": 0, "cannot_tell": 0}
    for _ in range(tables):
        nk, y = planted_table(form, m, rng, sigma_scale)
        errors = {f: loo_mse(_fit(LAWS[f"{f}_n"], nk, y)) for f in FORMS}
        if any(isinstance(e, str) for e in errors.values()):
            raise ValueError(f"leave-one-out impossible at m = {m}: {errors}")
        preferred, _ = verdict(errors["power"], errors["floor"])
        counts["cannot_tell" if preferred is None else "right" if preferred == form else "wrong"] += 1
    return {key: value / tables for key, value in counts.items()}


def coverage(form: str, m: int, tables: int, replicates: int, seed: int, sigma_scale: float = 1.0) -> dict[str, dict[str, float]]:
    """Per parameter of the planted ``form`` law fitted by the same law at m cells: the
    fraction of ``tables`` whose reported interval (``reported``) and whose bootstrap percentile
    interval alone (``bootstrap``) hold the planted value, and the fraction of replicates that
    succeeded (``succeeded``)."""
    law = LAWS[f"{form}_n"]
    rng = np.random.default_rng([seed, m, FORMS.index(form), 1])
    true = to_public(law, planting()[0][form])
    hits = {kind: np.zeros(len(true)) for kind in ("reported", "bootstrap")}
    succeeded = 0
    for _ in range(tables):
        nk, y = planted_table(form, m, rng, sigma_scale)
        fit = _fit(law, nk, y)
        samples = parametric_samples(fit, replicates, rng)
        succeeded += len(samples)
        lo, hi = parameter_intervals(fit, samples, linearise(fit))
        hits["reported"] += (lo <= true) & (true <= hi)
        boot_lo, boot_hi = np.percentile(to_public(law, samples), TAILS_PERCENT, axis=0)
        hits["bootstrap"] += (boot_lo <= true) & (true <= boot_hi)
    out = {name: {kind: float(h[i] / tables) for kind, h in hits.items()} for i, name in enumerate(law.param_names)}
    return out | {"succeeded": {"fraction": succeeded / (tables * replicates)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", type=int, default=60, help="planted tables per row")
    parser.add_argument("--replicates", type=int, default=50, help="bootstrap replicates per table")
    parser.add_argument("--sigma-scale", type=float, nargs="+", default=[1.0])
    parser.add_argument("--ms", type=int, nargs="+", default=[5, 6, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coverage-ms", type=int, nargs="+", default=[5, 8], help="m of the coverage rows")
    args = parser.parse_args()
    thetas, sigma = planting()
    for form in FORMS:
        print(f"planted {form}: {dict(zip(LAWS[f'{form}_n'].param_names, to_public(LAWS[f'{form}_n'], thetas[form]).round(4)))}")
    print(f"sigma (log) = {sigma:.4f}")
    print("\nchoice: sigma×  m  truth  right  wrong  cannot_tell")
    for scale in args.sigma_scale:
        for m in args.ms:
            for form in FORMS:
                r = choice_rates(form, m, args.tables, args.seed, scale)
                print(f"{scale:5.2f}  {m}  {form:5s}  {r['right']:.3f}  {r['wrong']:.3f}  {r['cannot_tell']:.3f}")
    print("\ncoverage: sigma×  m  law  parameter  reported  bootstrap-only  (replicates succeeded)")
    for scale in args.sigma_scale:
        for m in args.coverage_ms:
            for form in FORMS:
                c = coverage(form, m, args.tables, args.replicates, args.seed, scale)
                done = c.pop("succeeded")["fraction"]
                for name, v in c.items():
                    print(f"{scale:5.2f}  {m}  {form:5s}  {name}  {v['reported']:.3f}  {v['bootstrap']:.3f}  ({done:.3f})")


if __name__ == "__main__":
    main()
