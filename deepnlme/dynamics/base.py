"""The dynamics contract: individual parameters + a Population's doses -> compartment amounts.

A dynamics object maps ``indiv`` (dict of individual parameters, each ``(N,)``) and a
:class:`~deepnlme.data.population.Population` to the amounts in every compartment at the
observation times, a tensor ``(N, T, n_compartments)`` in the file's amount units.
Compartments are numbered like NONMEM's CMT: 1-based, in the order of ``compartments``;
CMT 0 in the data means the model's default dose (or observation) compartment.

Optional individual parameters understood by every dynamics:
``bioav`` (bioavailability, all doses), ``lag`` (absorption lag time, all doses),
``bioav_<name>`` / ``lag_<name>`` (doses into compartment ``<name>``, overriding the former),
``duration`` (infusion duration for doses with RATE=-2) and ``rate`` (for RATE=-1).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from deepnlme.data.population import Population


class Dynamics(nn.Module):
    """Base class: subclasses set the class attributes and implement :meth:`forward`."""

    compartments: tuple[str, ...] = ()
    required: tuple[str, ...] = ()  # individual parameters the dynamics needs
    default_dose_cmt: int = 1  # 1-based CMT used where the data says CMT 0
    default_obs_cmt: int = 1

    def forward(self, indiv: dict[str, Tensor], pop: Population) -> Tensor:
        """Amounts ``(N, T, n_compartments)`` at ``pop.obs_time``."""
        raise NotImplementedError

    def amounts(
        self, indiv: dict[str, Tensor], pop: Population, names: Sequence[str]
    ) -> dict[str, Tensor]:
        """Amounts ``(N, T)`` by compartment name, for (at least) the compartments ``names``.

        The default computes every compartment with :meth:`forward`; subclasses may compute
        only those asked for (the fitting loops differentiate this up to third order, and
        work on a compartment nobody observes is wasted there several times over).
        """
        full = self(indiv, pop)
        return {n: full[..., j] for j, n in enumerate(self.compartments)}

    def check_params(self, indiv: dict[str, Tensor]) -> None:
        missing = [k for k in self.required if k not in indiv]
        if missing:
            raise KeyError(
                f"{type(self).__name__} needs individual parameters {list(self.required)}; "
                f"pre() did not return {missing}"
            )
