"""Benchmark: the batched ODE path against a naive per-subject ``odeint`` loop.

Model: the two-compartment Michaelis–Menten oral model of the zoo
(:class:`deepnlme.model.zoo.ode_pk.TwoCmtMMOralModel`, no closed form), on Theophylline-like
populations: two oral doses (0 h and 12 h) and 10 concentrations per subject at jittered
times, so that every subject has its own event grid. Timed: one evaluation of the summed
negative log joint density Σ_i l_i(η_i) (residual likelihood + η prior, at random η) and its
gradient with respect to every fixed effect and η — the dynamics-bound step of every
estimator (a Laplace/FOCEI objective makes several of these). Peak memory: the process's
peak resident set on CPU (each measurement runs in a fresh process), peak allocated memory
on CUDA.

The naive loop integrates each subject alone with ``torchdiffeq.odeint`` (dopri5, same
tolerances), one call per segment between events, with doses added between calls; it is
timed on ``--naive-subset`` subjects and extrapolated linearly (it is linear in the number
of subjects by construction).

Usage::

    python scripts/benchmark_ode.py --sizes 1000 10000 100000 [--modes batched adjoint]
        [--device cuda --dtype float32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from deepnlme.data.population import Population
from deepnlme.inference.joint import NegLogJoint
from deepnlme.model.zoo.ode_pk import TwoCmtMMOralModel, two_cmt_mm_rhs

TIMES = np.array([0.25, 0.5, 1.0, 2.0, 3.5, 5.0, 7.0, 9.0, 12.5, 24.0])


def population(n: int, seed: int, dtype: torch.dtype, device: str) -> Population:
    """Padded population built directly (the CSV layer is not what is timed)."""
    rng = np.random.default_rng(seed)
    obs = np.sort(TIMES[None, :] * rng.uniform(0.9, 1.1, (n, len(TIMES))), axis=1)
    amt = rng.uniform(3.0, 6.0, (n, 1)).round(2) * np.ones((1, 2))
    dose_time = np.array([[0.0, 12.0]]).repeat(n, 0)
    conc = rng.uniform(1.0, 10.0, obs.shape)

    def t(x, dt=dtype):
        return torch.as_tensor(x, dtype=dt, device=device)

    zeros_d = torch.zeros(n, 2, dtype=dtype, device=device)
    long_d = torch.zeros(n, 2, dtype=torch.long, device=device)
    long_o = torch.zeros(n, len(TIMES), dtype=torch.long, device=device)
    return Population(
        ids=[str(i + 1) for i in range(n)],
        covariate_names=[],
        obs_time=t(obs),
        obs_dv=t(conc),
        obs_cmt=long_o,
        obs_mask=torch.ones(n, len(TIMES), dtype=torch.bool, device=device),
        obs_epoch=long_o,
        obs_row=long_o,
        dose_time=t(dose_time),
        dose_amt=t(amt),
        dose_rate=zeros_d,
        dose_duration=zeros_d,
        dose_cmt=long_d,
        dose_ss=long_d,
        dose_ii=zeros_d,
        dose_mask=torch.ones(n, 2, dtype=torch.bool, device=device),
        dose_epoch=long_d,
        covariates=torch.zeros(n, 0, dtype=dtype, device=device),
        obs_covariates=torch.zeros(n, len(TIMES), 0, dtype=dtype, device=device),
        subject_index=torch.arange(n, device=device),
        source="benchmark",
    )


def naive_nll(model: TwoCmtMMOralModel, eta: torch.Tensor, pop: Population, solver: dict):
    """Σ_i l_i(η_i) with one ``odeint`` call per subject and segment (a Python loop)."""
    from torchdiffeq import odeint

    indiv = model.individual_parameters(eta, pop)
    p = model.param_values()
    total = -model.eta_log_prior(eta).sum()
    for i in range(len(pop)):
        ind = two_cmt_mm_rhs.prepare({k: v[i : i + 1] for k, v in indiv.items()})
        dose_t = pop.dose_time[i].tolist()
        events = sorted({*dose_t, *pop.obs_time[i].tolist()})
        x = torch.zeros(1, 3, dtype=eta.dtype, device=eta.device)
        into_depot = torch.tensor([[1.0, 0.0, 0.0]], dtype=eta.dtype, device=eta.device)
        central = {}
        prev = events[0]
        for ev in events:
            if ev > prev:
                grid = torch.tensor([prev, ev], dtype=eta.dtype, device=eta.device)
                x = odeint(lambda t, y, ind=ind: two_cmt_mm_rhs(t, y, ind), x, grid, **solver)[-1]
            for j, td in enumerate(dose_t):
                if td == ev:
                    x = x + pop.dose_amt[i, j] * into_depot
            central[ev] = x[0, 1]
            prev = ev
        pred = torch.stack([central[t] for t in pop.obs_time[i].tolist()]) / ind["v"]
        r = pop.obs_dv[i] - pred
        s2 = p["sigma_add"] ** 2
        total = total + 0.5 * (torch.log(2 * torch.pi * s2) * r.numel() + (r * r).sum() / s2)
    return total


def measure(n: int, mode: str, args) -> dict:
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    solver = dict(method=args.method, rtol=args.rtol, atol=args.atol)
    if args.max_step:
        solver["max_step"] = args.max_step
    if mode == "adjoint":
        solver["adjoint"] = True
    model = TwoCmtMMOralModel(solver=solver).to(device=args.device, dtype=dtype)
    pop = population(n, args.seed, dtype, args.device)
    eta = (0.3 * torch.randn(n, model.n_eta, dtype=dtype, device=args.device)).requires_grad_()
    joint = NegLogJoint(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def once():
        if mode == "naive":
            tol = dict(method="dopri5", rtol=args.rtol, atol=args.atol)
            loss = naive_nll(model, eta, pop, tol)
        else:
            loss = joint(eta, pop).nll.sum()
        grads = torch.autograd.grad(loss, [eta, *params])
        return float(loss), grads

    if args.device.startswith("cuda"):
        once()  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    value, _ = once()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "n": n,
        "mode": mode,
        "seconds": time.perf_counter() - start,
        "peak_mb": peak,
        "value": value,
    }


def run_child(n: int, mode: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--one", str(n), mode, *argv]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"n": n, "mode": mode, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--naive-subset", type=int, default=20)
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["batched"],
        choices=["batched", "adjoint"],
        help="batched: autograd through the solver; adjoint: adjoint=True (less memory)",
    )
    ap.add_argument("--method", default="dopri5")
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--atol", type=float, default=1e-8)
    ap.add_argument("--max-step", type=float, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--one", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1], args)))
        return
    argv = sys.argv[1:]
    naive = run_child(args.naive_subset, "naive", argv)
    per_subject = naive.get("seconds", float("nan")) / args.naive_subset
    check = run_child(args.naive_subset, "batched", argv)
    print(f"solver {args.method} rtol {args.rtol} atol {args.atol}, {args.dtype} on {args.device}")
    print(
        f"naive per-subject odeint loop: {naive.get('seconds', float('nan')):.2f} s for "
        f"{args.naive_subset} subjects ({per_subject * 1e3:.1f} ms per subject), "
        f"peak {naive.get('peak_mb', float('nan')):.0f} MB {naive.get('error', '')}"
    )
    print(
        f"same subjects: objective naive {naive.get('value', float('nan')):.8f}, "
        f"batched {check.get('value', float('nan')):.8f} {check.get('error', '')}"
    )
    print(
        f"{'subjects':>9} {'mode':>8} {'seconds':>9} {'peak MB':>9} {'naive s (extrap.)':>18} "
        f"{'speed-up':>9}"
    )
    for n in args.sizes:
        for mode in args.modes:
            r = run_child(n, mode, argv)
            if "error" in r:
                print(f"{n:>9} {mode:>8} failed: {r['error']}")
                continue
            extrap = per_subject * n
            print(
                f"{n:>9} {mode:>8} {r['seconds']:9.2f} {r['peak_mb']:9.0f} {extrap:18.1f} "
                f"{extrap / r['seconds']:9.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
