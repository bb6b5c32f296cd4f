"""Network blocks for NLME models: covariate scaling and an MLP over (covariates, η).

Everything is batched over subjects: covariates are ``(N, C)``, random effects ``(N, K)``,
outputs ``(N, n_out)``. The networks sit inside the Laplace objective, which differentiates
twice with respect to η (the Hessian) and once more with respect to the weights, so only
smooth activations are offered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

#: Smooth (C², so that Laplace Hessians are meaningful) activations by name.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}


class CovariateScaler(nn.Module):
    """Fixed affine normalization ``(x − center) / scale`` of covariates ``(N, C)``.

    ``center`` and ``scale`` are buffers (they follow ``.double()`` / ``.to()`` and are saved
    in the state dict, but are never trained). Set them from constants at construction, or
    from a fitting population with :meth:`fit` — never from data that includes held-out
    subjects.
    """

    center: Tensor
    scale: Tensor

    def __init__(self, center: Sequence[float], scale: Sequence[float]):
        super().__init__()
        center_t = torch.as_tensor(list(center), dtype=torch.get_default_dtype())
        scale_t = torch.as_tensor(list(scale), dtype=torch.get_default_dtype())
        if center_t.shape != scale_t.shape or center_t.ndim != 1:
            raise ValueError(f"center and scale must be equal-length lists, got {center}, {scale}")
        if (scale_t <= 0).any():
            raise ValueError(f"scales must be > 0, got {scale_t.tolist()}")
        self.register_buffer("center", center_t)
        self.register_buffer("scale", scale_t)

    def forward(self, x: Tensor) -> Tensor:
        """Normalized covariates, ``(N, C)`` → ``(N, C)``."""
        return (x - self.center) / self.scale

    @torch.no_grad()
    def fit(self, x: Tensor, min_scale: float = 1e-8) -> None:
        """Set center/scale to the column means/SDs of ``x`` ``(N, C)`` (SD floored at 1 if 0)."""
        center = x.mean(0)
        scale = x.std(0, unbiased=False) if x.shape[0] > 1 else torch.ones_like(center)
        scale = torch.where(scale > min_scale, scale, torch.ones_like(scale))
        self.center.copy_(center.to(self.center))
        self.scale.copy_(scale.to(self.scale))


class CovariateEtaMLP(nn.Module):
    """MLP ``f(x, η)``: normalized covariates ``(N, C)`` and η ``(N, K)`` → ``(N, n_out)``.

    Layers: ``[C + K] → hidden[0] → … → hidden[-1] → n_out`` with ``activation`` between
    them. Weights are drawn from ``U(−1/√fan_in, 1/√fan_in)`` (PyTorch's default bounds) with a
    private generator seeded by ``seed``, so the initialization is deterministic and does not
    touch the global RNG. With ``zero_last=True`` the output layer starts at zero, so the
    untrained network outputs 0 for every input.
    """

    def __init__(
        self,
        n_covariates: int,
        n_eta: int,
        n_out: int,
        hidden: Sequence[int] = (16, 16),
        activation: str = "tanh",
        seed: int = 0,
        zero_last: bool = True,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)} (smooth, as the Laplace "
                f"objective differentiates through it), got {activation!r}"
            )
        self.n_covariates = int(n_covariates)
        self.n_eta = int(n_eta)
        self.n_out = int(n_out)
        sizes = [self.n_covariates + self.n_eta, *[int(h) for h in hidden], self.n_out]
        if sizes[0] == 0:
            raise ValueError("the network needs at least one input (covariates or η)")
        layers: list[nn.Module] = []
        for j, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            if j > 0:
                layers.append(ACTIVATIONS[activation]())
            layers.append(nn.Linear(fan_in, fan_out))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters(seed, zero_last)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0, zero_last: bool = True) -> None:
        """Deterministic initialization from ``seed`` (output layer zero if ``zero_last``)."""
        generator = torch.Generator().manual_seed(int(seed))
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        for j, lin in enumerate(linears):
            if zero_last and j == len(linears) - 1:
                lin.weight.zero_()
                lin.bias.zero_()
                continue
            bound = 1.0 / math.sqrt(max(lin.in_features, 1))
            w = torch.rand(lin.weight.shape, generator=generator, dtype=torch.float64)
            b = torch.rand(lin.bias.shape, generator=generator, dtype=torch.float64)
            lin.weight.copy_((2 * w - 1) * bound)
            lin.bias.copy_((2 * b - 1) * bound)

    def forward(self, x: Tensor, eta: Tensor) -> Tensor:
        """``(N, C)``, ``(N, K)`` → ``(N, n_out)``."""
        if x.shape[-1] != self.n_covariates or eta.shape[-1] != self.n_eta:
            raise ValueError(
                f"expected {self.n_covariates} covariates and {self.n_eta} random effects, "
                f"got inputs {tuple(x.shape)} and {tuple(eta.shape)}"
            )
        return self.layers(torch.cat([x.to(eta.dtype), eta], dim=-1))

    def sum_of_squares(self) -> Tensor:
        """Σ w² over every weight and bias (the L2 penalty's sum), a scalar."""
        return sum((w * w).sum() for w in self.parameters())

    def eta_sum_of_squares(self) -> Tensor:
        """Σ w² over the first layer's weights that multiply η (part of :meth:`sum_of_squares`)."""
        first = self.layers[0].weight  # (hidden[0] or n_out, C + K)
        w = first[:, self.n_covariates :]
        return (w * w).sum()


def scaler_from_mapping(
    names: Sequence[str],
    normalization: Mapping[str, Sequence[float]],
    defaults: Mapping[str, Sequence[float]] | None = None,
) -> tuple[CovariateScaler, list[str]]:
    """A :class:`CovariateScaler` for ``names`` from ``{name: (center, scale)}`` constants.

    ``normalization`` overrides ``defaults``; names found in neither get center 0, scale 1
    and are returned in the second element (so callers can warn or fit them).
    """
    table = {**(defaults or {}), **dict(normalization)}
    center, scale, missing = [], [], []
    for name in names:
        if name in table:
            c, s = (float(v) for v in table[name])
        else:
            c, s = 0.0, 1.0
            missing.append(name)
        center.append(c)
        scale.append(s)
    return CovariateScaler(center, scale), missing
