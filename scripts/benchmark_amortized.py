"""Amortized VI at scale, and EBEs by the encoder vs by Laplace mode-finding.

1. Fits ``--model`` (the deep compartment model, ``NeuralPKModel`` with the settings of
   configs/model/deep_compartment.yaml, or the one-compartment oral model with proportional
   error) by VI with the amortized guide on ``--n-subjects`` subjects of the main job's
   synthetic PK design (``--heldout-fraction`` held out), minibatches of ``--batch``
   subjects, Adam: time per epoch and peak memory (CUDA allocator on GPU, process max RSS on
   CPU). Then the encoder alone at the fitted parameters (``--encoder-epochs``, the
   amortization gap; ``VariationalEstimator.fit_encoder``), on the fitted subjects and
   ``--encoder-simulations`` simulated copies of their design.
2. Held-out subjects: IPRED RMSE at the encoder's q(η) means vs at the Laplace modes η̂ (same
   model, same fitted parameters).
3. ``--n-new`` new subjects: EBEs by one encoder forward pass vs by Laplace mode-finding from
   η = 0 (``find_modes``, the Laplace fits' settings): best wall time of ``--repeats`` runs
   each, one after the other in this process, their ratio, and the IPRED agreement
   (RMS difference of the two IPREDs relative to the RMS of the Laplace IPRED).

``--model neural_pk --checkpoint RUN/checkpoints/last.ckpt``: the main job itself. The
checkpoint of a ``python3 train.py`` run (the neural ODE ``NeuralODEPKModel`` fitted by FOCEI)
gives the model with its fitted parameters, the data (its data config: the same subjects, the
same fit / held-out split) and the Laplace mode search (its estimator's ``inner`` settings);
no population fit here, only the encoder phase. The new subjects are that data config's design
with ``--n-new`` subjects and the next data seed.

    PYTHONPATH=. python scripts/benchmark_amortized.py --n-subjects 10000 --epochs 3
    PYTHONPATH=. python scripts/benchmark_amortized.py --n-subjects 200 \
        --heldout-fraction 0.25 --batch 150 --epochs 1000 --encoder-simulations 20
    PYTHONPATH=. python scripts/benchmark_amortized.py --n-subjects 100000 --device cuda
    PYTHONPATH=. python scripts/benchmark_amortized.py --model neural_pk \
        --checkpoint RUN/checkpoints/last.ckpt --encoder-epochs 500 --encoder-lr 0.005 \
        --encoder-simulations 100 --batch 512 --residual-input
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deepnlme.data.population import Population
from deepnlme.data.split import split_heldout
from deepnlme.data.synthetic import COVARIATES, synthetic_pk
from deepnlme.diagnostics.predictions import predict, rmse
from deepnlme.fitted import FittedModel
from deepnlme.inference import LaplaceEstimator, OuterOptions, fit
from deepnlme.inference.inner import InnerOptions, find_modes
from deepnlme.inference.joint import NegLogJoint
from deepnlme.inference.pyro.program import whole
from deepnlme.inference.pyro.vi import VariationalEstimator
from deepnlme.model.zoo.neural import NeuralPKModel
from deepnlme.model.zoo.neural_ode import NeuralODEPKModel
from deepnlme.model.zoo.pk import OneCmtOralModel
from deepnlme.training.stochastic import SubjectSampler

NEURAL_PK = {  # configs/model/deep_compartment.yaml
    "covariates": list(COVARIATES),
    "hidden": [8],
    "weight_decay": 15.0,
    "eta_weight_decay": 100.0,
    "error": "proportional",
}
MODELS = {
    "deep_compartment": lambda: NeuralPKModel(**NEURAL_PK),
    "one_cmt_oral": lambda: OneCmtOralModel(  # the deep compartment model's start
        error="proportional", init={"tvka": 1.0, "tvcl": 4.0, "tvv": 40.0}
    ),
}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Mode search of method=laplace / method=focei (configs/method/*.yaml ``inner``).
LAPLACE_INNER = InnerOptions(max_iter=100, gtol=1e-6)
#: The main job's model (``--model neural_pk``): only from a checkpoint of ``train.py``.
MAIN_JOB = "neural_pk"


@dataclass
class Setup:
    """What the benchmark compares on: the model, the Laplace mode search, the subjects."""

    model: torch.nn.Module
    inner: InnerOptions  # the fit's mode search (Laplace EBEs of held-out and new subjects)
    fit_pop: Population
    held: Population
    new: Population  # --n-new subjects for the EBE timings
    info: dict  # where it came from (results JSON)


def main_job_setup(checkpoint: Path, n_new: int, device: torch.device) -> Setup:
    """The main job from a checkpoint of ``python3 train.py``: the fitted neural ODE, its
    estimator's mode search, its data config's fit / held-out split, and ``n_new`` new
    subjects of that design (the next data seed, nobody held out)."""
    from deepnlme.training import build

    try:
        fitted = FittedModel.load(checkpoint, map_location=device)
    except ValueError as exc:  # not a deepnlme checkpoint, untrusted class, ...: one line
        raise SystemExit(f"error: {exc}") from None
    if not isinstance(fitted.model, NeuralODEPKModel):
        raise SystemExit(
            f"{checkpoint}: a {type(fitted.model).__name__} fit, not the main job's "
            f"{NeuralODEPKModel.__name__}"
        )
    data = dict(fitted.config["data"])
    fit_pop, held = build.load_data(data, fitted.dtype)
    if held is None:
        raise SystemExit(f"{checkpoint}: the fit held out no subjects (data.heldout_fraction)")
    new_data = {**data, "n_subjects": n_new, "seed": int(data["seed"]) + 1,
                "heldout_fraction": 0.0}
    new, _ = build.load_data(new_data, fitted.dtype)
    info = {
        "checkpoint": str(checkpoint),
        "method": fitted.names.get("method", fitted.config["method"].get("name")),
        "data": {k: data.get(k) for k in ("name", "n_subjects", "seed", "heldout_fraction",
                                           "split_seed")},
    }
    return Setup(fitted.model, fitted.estimator.inner, fit_pop.to(device), held.to(device),
                 new.to(device), info)


def synthetic_setup(args, device: torch.device) -> Setup:
    """``args.model`` (untrained) on ``args.n_subjects`` subjects of the main job's design,
    ``args.heldout_fraction`` held out; the Laplace fits' mode search."""
    pop = synthetic_pk(n_subjects=args.n_subjects, seed=args.seed)
    fit_pop, held = split_heldout(pop, args.heldout_fraction, args.seed)
    new = synthetic_pk(n_subjects=args.n_new, seed=args.seed + 1)
    info = {"n_subjects": args.n_subjects, "heldout_fraction": args.heldout_fraction}
    return Setup(MODELS[args.model]().to(device), LAPLACE_INNER, fit_pop.to(device),
                 held.to(device), new.to(device), info)


def laplace_modes(model, pop, inner: InnerOptions = LAPLACE_INNER) -> torch.Tensor:
    """Laplace EBEs: batched Newton mode search from η = 0 with the options ``inner``."""
    start = pop.obs_time.new_zeros(len(pop), model.n_eta)
    with torch.no_grad():
        return find_modes(NegLogJoint(model), start, pop, options=inner).eta


def best_time(work, repeats: int, device: torch.device) -> tuple[float, object]:
    """Shortest wall time of ``repeats`` runs of ``work()`` (others' jobs only add time) and
    the last result."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def fit_vi(est: VariationalEstimator, fit_pop, args, device) -> tuple[list[float], int]:
    """Joint amortized VI fit (model and encoder): Adam, cosine schedule down to 5% of
    ``args.lr``, ``args.epochs`` passes in minibatches of ``args.batch`` subjects. Returns the
    seconds of each epoch and the steps per epoch."""
    model, guide = est.model, est.guide
    params = [p for p in [*model.parameters(), *guide.parameters()] if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    sampler = SubjectSampler(len(fit_pop), args.batch, args.seed)
    steps_per_epoch = len(sampler)
    total = args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s / total, 1)))
    )
    epoch_seconds = []
    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        synchronize(device)
        start = time.perf_counter()
        for positions in sampler:
            index = torch.as_tensor(positions, device=device)
            batch = whole(fit_pop.subset(index))._replace(index=index)
            est.step = step
            optimizer.zero_grad()
            loss = est.loss(batch)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
        synchronize(device)
        epoch_seconds.append(time.perf_counter() - start)
        per_subject = float(loss.detach()) / len(fit_pop)
        print(f"epoch {epoch}: {epoch_seconds[-1]:.2f} s, -ELBO/N {per_subject:.4f}", flush=True)
    return epoch_seconds, steps_per_epoch


def fit_focei(model, fit_pop) -> dict:
    """FOCEI fit of ``model`` (full-batch L-BFGS, the settings of ``method=focei``)."""
    est = LaplaceEstimator(model, hessian="expected", interaction=True, inner=LAPLACE_INNER)
    result = fit(est, fit_pop, OuterOptions())
    return {"converged": result.converged, "n_iter": result.n_iter, "loglik": -result.loss}


def heldout_rmse(est: VariationalEstimator, held, reference: float) -> dict[str, float]:
    with torch.no_grad():
        eta = est.posterior(held)[0]
    value = rmse(predict(est.model, held, eta).ipred, held)
    return {"rmse_ipred_encoder": value, "ratio_to_laplace": value / reference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-subjects", type=int, default=10_000)
    parser.add_argument("--population-fit", default="vi", choices=["vi", "focei"],
                        help="population parameters by the joint VI fit or by FOCEI")
    parser.add_argument("--epochs", type=int, default=3, help="joint fit (model and encoder)")
    parser.add_argument("--encoder-epochs", type=int, default=0,
                        help="then the encoder alone at the fitted parameters")
    parser.add_argument("--encoder-simulations", type=int, default=0,
                        help="simulated copies of the fitted design added to the encoder phase")
    parser.add_argument("--encoder-target", default="laplace", choices=["laplace", "elbo"])
    parser.add_argument("--residual-input", action="store_true",
                        help="the encoder also reads the population prediction")
    parser.add_argument("--heldout-fraction", type=float, default=0.2)
    parser.add_argument("--model", default="deep_compartment",
                        choices=[*sorted(MODELS), MAIN_JOB])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"--model {MAIN_JOB}: RUN/checkpoints/last.ckpt of train.py")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--encoder-lr", type=float, default=0.003)
    parser.add_argument("--hidden", type=int, default=64, help="encoder head width")
    parser.add_argument("--obs-hidden", type=int, default=16, help="encoder observation layer")
    parser.add_argument("--n-new", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="EBE timings: best of this many")
    parser.add_argument("--laplace-repeats", type=int, default=None,
                        help="Laplace EBE timings: best of this many (default --repeats)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    device = torch.device(args.device)

    if (args.model == MAIN_JOB) != (args.checkpoint is not None):
        parser.error(f"--model {MAIN_JOB} goes with --checkpoint (a train.py run), and only it")
    if args.checkpoint is not None:
        setup = main_job_setup(args.checkpoint, args.n_new, device)
        args.population_fit = "checkpoint"
    else:
        setup = synthetic_setup(args, device)
    model, fit_pop, held, new = setup.model, setup.fit_pop, setup.held, setup.new
    est = VariationalEstimator(
        model, guide="amortized", hidden=args.hidden, obs_hidden=args.obs_hidden,
        residual_input=args.residual_input, seed=args.seed,
    )
    est.setup(fit_pop)
    if args.population_fit == "checkpoint":  # fitted by train.py
        epoch_seconds, steps_per_epoch, population_fit = [], None, {}
    elif args.population_fit == "focei":
        start = time.perf_counter()
        focei_fit = fit_focei(model, fit_pop)
        population_fit = {**focei_fit, "seconds": time.perf_counter() - start}
        epoch_seconds, steps_per_epoch = [], math.ceil(len(fit_pop) / args.batch)
    else:
        epoch_seconds, steps_per_epoch = fit_vi(est, fit_pop, args, device)
        population_fit = {"seconds": sum(epoch_seconds)}
    print(f"population fit ({args.population_fit}): {population_fit}", flush=True)

    lap_eta = laplace_modes(model, held, setup.inner)
    rmse_laplace = rmse(predict(model, held, lap_eta).ipred, held)
    after_fit = heldout_rmse(est, held, rmse_laplace)
    print(f"held-out IPRED RMSE: Laplace {rmse_laplace:.4f}, encoder before its phase "
          f"{after_fit['rmse_ipred_encoder']:.4f}", flush=True)
    synchronize(device)
    start = time.perf_counter()
    encoder_pop = est.encoder_population(fit_pop, args.encoder_simulations)
    encoder_steps = args.encoder_epochs * math.ceil(len(encoder_pop) / args.batch)
    encoder_losses = est.fit_encoder(
        encoder_pop, encoder_steps, args.batch, args.encoder_lr, target=args.encoder_target
    )
    synchronize(device)
    encoder_seconds = time.perf_counter() - start
    final = heldout_rmse(est, held, rmse_laplace)
    print(f"encoder phase: {encoder_seconds:.1f} s, held-out IPRED RMSE "
          f"{final['rmse_ipred_encoder']:.4f}", flush=True)

    with torch.no_grad():
        est.posterior(new.subset(torch.arange(min(100, len(new)), device=device)))  # warm-up
        t_encoder, enc_new = best_time(lambda: est.posterior(new)[0], args.repeats, device)
    laplace_repeats = args.laplace_repeats or args.repeats
    t_laplace, lap_new = best_time(
        lambda: laplace_modes(model, new, setup.inner), laplace_repeats, device
    )
    ipred_enc = predict(model, new, enc_new).ipred
    ipred_lap = predict(model, new, lap_new).ipred
    mask = new.obs_mask
    diff = ((ipred_enc - ipred_lap)[mask] ** 2).mean().sqrt()
    scale = (ipred_lap[mask] ** 2).mean().sqrt()
    report = {
        "model": args.model,
        **setup.info,
        "inner": asdict(setup.inner),
        "population_fit": {"method": args.population_fit, **population_fit},
        "n_fit": len(fit_pop),
        "n_heldout": len(held),
        "device": str(device),
        "dtype": args.dtype,
        "batch": args.batch,
        "hidden": args.hidden,
        "obs_hidden": args.obs_hidden,
        "residual_input": args.residual_input,
        "steps_per_epoch": steps_per_epoch,
        "seconds_per_epoch": epoch_seconds,
        "encoder_epochs": args.encoder_epochs,
        "encoder_steps": encoder_steps,
        "encoder_seconds": encoder_seconds,
        "encoder_simulations": args.encoder_simulations,
        "encoder_target": args.encoder_target,
        "encoder_loss_last_steps": sum(encoder_losses[-10:]) / 10,
        "peak_memory_mb": peak_memory_mb(device),
        "parameters": {
            name: value.tolist()
            for name, value in model.param_values().items()
            if value.numel() <= 9
        },
        "heldout_rmse_ipred_laplace": rmse_laplace,
        "heldout_before_encoder_phase": after_fit,
        "heldout_rmse_ipred_encoder": final["rmse_ipred_encoder"],
        "heldout_rmse_ratio": final["ratio_to_laplace"],
        "n_new": len(new),
        "repeats": {"encoder": args.repeats, "laplace": laplace_repeats},
        "ebe_seconds_encoder": t_encoder,
        "ebe_seconds_laplace": t_laplace,
        "ebe_speedup": t_laplace / t_encoder,
        "ipred_relative_rms_difference": float(diff / scale),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
