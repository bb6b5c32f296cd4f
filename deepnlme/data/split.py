"""Seeded split of subjects into a fitting set and a held-out set."""

from __future__ import annotations

from dataclasses import replace

import torch

from deepnlme.data.population import Population


def split_heldout(pop: Population, fraction: float, seed: int) -> tuple[Population, Population]:
    """Hold out ``round(fraction * N)`` randomly chosen subjects, reproducibly for ``seed``.

    At least one subject is held out when ``fraction > 0`` and ``N >= 2``, and at least one is
    kept for fitting; ``fraction == 0`` (or ``N < 2``) gives ``(pop subset, empty Population)``
    with the empty one having ``N = 0``. Both parts keep the original order of subjects and
    their ``subject_index`` into the full dataset; ``meta["split"]`` is ``"fit"``/``"heldout"``.

    Raises:
        ValueError: ``fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n = len(pop)
    n_held = round(fraction * n)
    if fraction > 0 and n >= 2:
        n_held = min(max(n_held, 1), n - 1)
    else:
        n_held = 0
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=generator)
    held = perm[:n_held].sort().values
    fit = perm[n_held:].sort().values
    info = {"fraction": fraction, "seed": int(seed)}
    fit_pop = pop.subset(fit.tolist())
    held_pop = pop.subset(held.tolist())
    return (
        replace(fit_pop, meta={**pop.meta, **info, "split": "fit"}),
        replace(held_pop, meta={**pop.meta, **info, "split": "heldout"}),
    )
