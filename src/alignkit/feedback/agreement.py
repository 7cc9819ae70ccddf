"""Inter-annotator agreement: Krippendorff's alpha (nominal and interval).

    from alignkit.feedback.agreement import krippendorff_alpha, agreement_report
    krippendorff_alpha([[1, 1], [2, 2, 3], [4]], level="nominal")

Krippendorff, "Computing Krippendorff's Alpha-Reliability" (2011): build the
coincidence matrix o_ck from every unit with at least two values (each ordered pair
of values in a unit of m values adds 1/(m-1)), then

    alpha = 1 - D_o / D_e,   D_o = sum_ck o_ck d2(c,k) / n,
                             D_e = sum_ck n_c n_k d2(c,k) / (n (n-1)),

with d2 = [c != k] (nominal) or (c - k)^2 (interval). alpha >= 0.8 is reliable,
>= 0.667 tentative; 0 is chance agreement.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Hashable, Sequence

import numpy as np

LEVELS = ("nominal", "interval")


def krippendorff_alpha(units: Sequence[Sequence[Hashable]], level: str = "nominal") -> float:
    """Alpha over ``units``: each the values the coders gave one unit (missing ones left out).

    Units with fewer than two values are not pairable and are ignored. Returns NaN when
    no unit is pairable or every pairable value is the same (no expected disagreement).
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    pairable = [list(u) for u in units if len(u) >= 2]
    if not pairable:
        return float("nan")
    values = sorted({v for u in pairable for v in u}, key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(values)}
    V = len(values)
    coincidence = np.zeros((V, V))
    for u in pairable:
        counts = np.zeros(V)
        for v in u:
            counts[index[v]] += 1
        # ordered pairs of distinct coders: counts_c * counts_k, minus the self-pairs on the diagonal
        coincidence += (np.outer(counts, counts) - np.diag(counts)) / (len(u) - 1)
    n_c = coincidence.sum(axis=1)
    n = n_c.sum()
    if level == "nominal":
        d2 = 1.0 - np.eye(V)
    else:
        x = np.asarray(values, dtype=float)
        d2 = (x[:, None] - x[None, :]) ** 2
    d_observed = (coincidence * d2).sum() / n
    d_expected = (np.outer(n_c, n_c) * d2).sum() / (n * (n - 1))
    if d_expected == 0:
        return float("nan")
    return float(1.0 - d_observed / d_expected)


def _units_by_kind(examples) -> dict[str, tuple[str, list[list]]]:
    """Group every non-golden annotator judgement into units, per kind (and aspect).

    pairwise: a unit is one (row, aspect, answer pair); the value is which answer won
    (the lower index, the higher, or "tie") - nominal. binary: (row, aspect, answer),
    good/bad - nominal. rating: (row, aspect, answer), the score - interval.
    """
    units: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    levels: dict[str, str] = {}
    for r, ex in enumerate(examples):
        for lab in ex.labels:
            if lab.golden:
                continue
            aspect = lab.aspect or "overall"
            if lab.kind == "pairwise":
                i, j = sorted((lab.chosen, lab.rejected))
                value = "tie" if lab.tie else ("first" if lab.chosen == i else "second")
                name, key, level = f"pairwise/{aspect}", (r, i, j), "nominal"
            elif lab.kind == "binary":
                name, key, value, level = f"binary/{aspect}", (r, lab.answer), bool(lab.good), "nominal"
            elif lab.kind == "rating":
                name, key, value, level = f"rating/{aspect}", (r, lab.answer), float(lab.value), "interval"
            else:
                continue
            units[name][key].append(value)
            levels[name] = level
    return {name: (levels[name], list(u.values())) for name, u in units.items()}


def agreement_report(examples) -> dict[str, dict]:
    """Krippendorff's alpha per feedback kind/aspect, with how many units were pairable."""
    out = {}
    for name, (level, units) in sorted(_units_by_kind(examples).items()):
        pairable = sum(1 for u in units if len(u) >= 2)
        alpha = krippendorff_alpha(units, level=level)
        out[name] = {"alpha": None if math.isnan(alpha) else round(alpha, 4), "level": level,
                     "units": len(units), "pairable_units": pairable}
    return out
