"""How many network evaluations (NFE) each fast sampler needs to match 1000-step ancestral sampling.

    .venv/bin/python benchmarks/sampler_nfe.py [--n 4000] [--seeds 3] [--samplers dpm_solver_3,heun]

With the exact denoiser of eight Gaussians (dmlib.oracle) and the linear VP schedule, the quality of
a sample set is its sliced Wasserstein distance (SW) to a fresh data set of the same size, averaged
over seeds; every sampler of a seed gets the same x_T, data set and projections. For each sampler
(on the time grid its paper uses, dmlib.samplers.SAMPLERS) the table gives the smallest NFE from the
list at which its SW is within its target; the adaptive SDE solver picks its own steps and is swept
over tolerances instead.

Why two targets. With i.i.d. sets of 4000 points, SW is dominated by the multinomial noise of the
eight mode counts (data to data: about 0.095 +- 0.023, against 0.020 +- 0.0003 for sets with exactly
n/8 points per mode), which hides any sampler error below ~0.05. So the data sets hold exactly n/8
points per mode and x_T is a Latin-hypercube N(0, I) sample (stratified in angle and radius): both
are unbiased for their laws with far less noise. Deterministic samplers map x_T to modes by angle,
so their SW then measures their own error: their target is the SW of the converged ODE (DPM-Solver-3,
100 steps) plus two standard errors of a seed-averaged SW between balanced data sets. Stochastic
samplers re-randomise the mode counts as i.i.d. sampling does; their target is the SW of 1000-step
ancestral sampling plus two standard errors of a seed-averaged SW between i.i.d. data sets.
Target: the best solver needs at most 20 NFE. Runs in about two to three minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from dmlib import ddpm, metrics, samplers
from dmlib.data import eight_gaussians
from dmlib.oracle import MixtureOracle
from dmlib.schedules import get_schedule

NFE_LIST = (4, 6, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64, 100, 200)
TOLERANCES = (0.2, 0.1, 0.05, 0.02, 0.01)
STOCHASTIC = ("ddim_eta1", "heun_churn", "adaptive_sde")
PROJECTIONS = 128  # directions for SW: plenty in 2D, and sorting them is a large share of the run time


def latin_hypercube_normal(n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` points whose empirical law is N(0, I) in 2D, stratified in angle and in radius quantile."""
    angle = 2 * math.pi * (torch.arange(n) + torch.rand(n, generator=g)) / n
    q = (torch.randperm(n, generator=g) + torch.rand(n, generator=g)) / n
    radius = torch.sqrt(-2 * torch.log1p(-q))  # the chi distribution with 2 degrees of freedom
    return torch.stack([radius * angle.cos(), radius * angle.sin()], 1)


def balanced_sample(mix, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` points of an equal-weight isotropic mixture with exactly ``n / K`` points per component."""
    k = torch.arange(n) % mix.means.shape[0]
    std = mix.covs[0, 0, 0].sqrt()
    return (mix.means[k] + std * torch.randn(n, mix.dim, generator=g, dtype=mix.means.dtype)).float()


def steps_for(name: str, budget: int) -> int | None:
    """The most steps whose NFE fits the budget (grids end at t = 0), or None if too few for the method."""
    n = max((n for n in range(1, budget + 1) if samplers.nfe(name, n) <= budget), default=None)
    spec = samplers.SAMPLERS[name]
    needs = {"plms": 4, "deis": spec.options.get("order", 1)}.get(name, 1)
    return None if n is None or n < max(needs, 2 if spec.grid in ("logsnr", "edm") else 1) else n


def search(name, mean_sw, target, run_grid, run_adaptive):
    """The smallest NFE of the list (or the loosest tolerance) whose mean SW is within ``target``.

    Fixed-grid samplers are searched by bisection over the list, assuming SW falls as NFE grows (true of
    every trail we have printed; a linear scan costs twice as long). Returns ``(found, trail)``:
    ``found = (nfe, steps or tolerance, SW)`` or None, and every NFE:SW tried.
    """
    spec, trail = samplers.SAMPLERS[name], {}
    if spec.evals_per_step is None:  # adaptive: sweep the relative tolerance
        for tol in TOLERANCES:
            used = []
            value = mean_sw(lambda s, gen, tol=tol, used=used: run_adaptive(s, gen, tol, used))
            trail[round(statistics.mean(used))] = value
            if value <= target:
                return (round(statistics.mean(used)), f"eps_rel={tol}", value), trail
        return None, trail
    steps = sorted({n for n in (steps_for(name, b) for b in NFE_LIST) if n is not None})
    lo, hi = 0, len(steps)  # invariant: steps[hi] passes (hi = len: none known to), steps[< lo] fail
    while lo < hi:
        mid = (lo + hi) // 2
        value = mean_sw(lambda s, gen, n=steps[mid]: run_grid(name, n, s, gen))
        trail[samplers.nfe(name, steps[mid])] = value
        lo, hi = (lo, mid) if value <= target else (mid + 1, hi)
    if hi == len(steps):
        return None, trail
    return (samplers.nfe(name, steps[hi]), steps[hi], trail[samplers.nfe(name, steps[hi])]), trail


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="samples per set (a multiple of 8)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ancestral-steps", type=int, default=1000)
    parser.add_argument("--samplers", default=",".join(samplers.SAMPLERS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the oracle's ops are tiny)")
    args = parser.parse_args()
    if args.n % 8:
        parser.error("--n must be a multiple of 8 (balanced data sets)")
    torch.set_num_threads(args.threads)
    tic = time.perf_counter()

    mix, sched = eight_gaussians(), get_schedule("linear")
    den = MixtureOracle(mix, sched).denoiser()
    seeds = range(args.seeds)
    x_T = {s: latin_hypercube_normal(args.n, torch.Generator().manual_seed(s)) for s in seeds}
    data = {s: balanced_sample(mix, args.n, torch.Generator().manual_seed(1000 + s)) for s in seeds}

    def sw(x, s):  # the same projections for every sampler at seed s
        return metrics.sliced_wasserstein(
            x, data[s], PROJECTIONS, generator=torch.Generator().manual_seed(2000 + s)
        )

    def mean_sw(run):
        return statistics.mean(sw(run(s, torch.Generator().manual_seed(3000 + s)), s) for s in seeds)

    def run_grid(name, n, s, gen):
        spec = samplers.SAMPLERS[name]
        return spec.fn(den, x_T[s], samplers.time_grid(sched, n, spec.grid), generator=gen, **spec.options)

    eps_abs = 0.0078 * float(mix.means.abs().max() + 3 * 0.1)  # the paper's 1/128 of the data's half-range

    def run_adaptive(s, gen, tol, used):
        info = {}
        x = samplers.sample_adaptive_sde(
            den, x_T[s], torch.tensor([1.0, 0.0]), eps_rel=tol, eps_abs=eps_abs, info=info, generator=gen
        )
        used.append(info["nfe"])
        return x

    g = torch.Generator().manual_seed(4000)
    pairs = {"balanced": [], "i.i.d.": []}
    for _ in range(10):  # the noise of one SW estimate: SW between two fresh data sets
        a, b = balanced_sample(mix, args.n, g), balanced_sample(mix, args.n, g)
        pairs["balanced"].append(metrics.sliced_wasserstein(a, b, PROJECTIONS, generator=g))
        a, b = mix.sample(args.n, g), mix.sample(args.n, g)
        pairs["i.i.d."].append(metrics.sliced_wasserstein(a, b, PROJECTIONS, generator=g))
    balanced, iid = pairs["balanced"], pairs["i.i.d."]
    margins = {
        k: 2 * statistics.stdev(v) / math.sqrt(args.seeds) for k, v in (("ode", balanced), ("sde", iid))
    }
    ode = mean_sw(lambda s, gen: run_grid("dpm_solver_3", 100, s, gen))
    anc = mean_sw(
        lambda s, gen: ddpm.sample_ancestral(
            den, x_T[s], torch.linspace(1, 0, args.ancestral_steps + 1), generator=gen
        )
    )
    targets = {"ode": ode + margins["ode"], "sde": anc + margins["sde"]}
    print(f"eight Gaussians (std 0.1), linear VP, oracle denoiser; {args.n} samples x {args.seeds} seeds")
    for label, v in pairs.items():
        print(
            f"SW between two fresh data sets, {label:8s}: {statistics.mean(v):.4f} +- {statistics.stdev(v):.4f}"
        )
    print(
        f"ode target: converged ODE (DPM-Solver-3, 298 NFE) {ode:.4f} + {margins['ode']:.4f} = {targets['ode']:.4f}"
    )
    print(
        f"sde target: ancestral, {args.ancestral_steps} steps, {anc:.4f} + {margins['sde']:.4f} = {targets['sde']:.4f}"
    )
    print(f"\n{'sampler':18s} {'grid':9s} {'target':6s} {'NFE':>5s} {'steps':>12s} {'SW':>7s}   NFE:SW tried")

    best = {}
    for name in args.samplers.split(","):
        spec, family = samplers.SAMPLERS[name], "sde" if name in STOCHASTIC else "ode"
        found, trail = search(name, mean_sw, targets[family], run_grid, run_adaptive)
        cells = (str(found[0]), str(found[1]), f"{found[2]:.4f}") if found else ("> max", "-", "-")
        kind = spec.grid if spec.evals_per_step else "adaptive"
        tried = " ".join(f"{k}:{v:.4f}" for k, v in sorted(trail.items()))
        print(f"{name:18s} {kind:9s} {family:6s} {cells[0]:>5s} {cells[1]:>12s} {cells[2]:>7s}   {tried}")
        if found and found[0] < best.get(family, (math.inf,))[0]:
            best[family] = (found[0], name)
    print()
    for family, (nfe, name) in sorted(best.items()):
        print(f"best {family} sampler: {name} at {nfe} NFE ({'meets' if nfe <= 20 else 'misses'} <= 20 NFE)")
    print(f"{time.perf_counter() - tic:.0f} s")


if __name__ == "__main__":
    main()
