"""Every public path of dmlib runs with its inputs on another device, and creates what it needs there.

PyTorch's ``meta`` device holds shapes and dtypes but no data. Its elementwise kernels refuse a CPU
tensor of one or more dimensions ("Tensor on device cpu is not on the expected device meta!"; 0-dim CPU
tensors are allowed, as on CUDA), and reading a value (``.item()``, ``.tolist()``, ``bool()``) raises.
Its matrix products, ``einsum``, ``cdist`` and in-place ops do not check devices, so every meta test also
runs under :class:`StrictDevices`, which refuses any op that mixes devices, as CUDA does. Running the
library on meta inputs therefore finds, without a GPU, every tensor created on the CPU next to the
inputs, and every value read back to Python on the data path (where a function must read one, the test
says so and uses :func:`meta_values_are_zero`). Each test checks that the results, and the states a
sampler passes to its callback, live on the device.

The same test bodies run on ``cuda`` when there is one (the parameter is skipped otherwise) and there
compare the numbers with a CPU run: closely where the path is deterministic, statistically where the
device draws its own noise (:func:`same`).

Run on CUDA only (meta cannot): what goes through numpy / scipy by design (``sde.solve_pf_ode``,
``likelihood.ode_log_likelihood``), the adaptive SDE solver (its set of unfinished samples is a
data-dependent ``nonzero``), the moment-matched prior (``torch.cov`` has no meta kernel), a metric
given a mixture moved to the device (its isotropy check is a ``torch.allclose``), and a learned VDM
schedule inside the bounds and samplers (read at Python times, with ``float()``, and on the CPU to
build a time grid). On the CPU the first three are checked to keep their input's dtype and device.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dmlib import acceleration, cld, ddpm, metrics, samplers, score, sde
from dmlib import likelihood as L
from dmlib.nets import MLP
from dmlib.oracle import GaussianMixture, MixtureOracle
from dmlib.parameterization import Denoiser
from dmlib.schedules import Cosine, Linear, Sigmoid, SubVP, VarianceExploding, ddpm_tables

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
)
DEVICES = ["meta", CUDA]
B = 2048  # free on meta; on CUDA, enough samples for the statistical comparisons with the CPU


class StrictDevices(TorchFunctionMode):
    """Refuse, as CUDA does, any op whose tensors of one or more dimensions lie on different devices.

    meta checks devices only in its elementwise kernels: ``meta @ cpu``, ``meta += cpu``, ``einsum``
    and ``cdist`` let a CPU tensor through, and ``einsum`` may even answer on the CPU. Under this mode
    (every ``meta`` test runs under it) those fail too. Allowed, as on CUDA: 0-dim CPU tensors anywhere,
    moves (``to``, ``copy_``, item assignment) and CPU index tensors. Ops inside autograd's backward are
    not seen.
    """

    MOVES = {"to", "type_as", "copy_", "__setitem__", "__getitem__", "index_put", "index_put_", "as_tensor"}
    MOVES |= {"_has_compatible_shallow_copy_type"}  # Module.to asks it before moving a parameter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) not in self.MOVES:
            tensors = [x for x in leaves((args, kwargs)) if torch.is_tensor(x)]
            devices = {str(x.device) for x in tensors if x.ndim or x.device.type != "cpu"}
            if len(devices) > 1:
                raise RuntimeError(f"{getattr(func, '__name__', func)} mixes tensors on {sorted(devices)}")
        return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def strict_devices_on_meta(request):
    """Every test with ``device="meta"`` runs under :class:`StrictDevices`."""
    callspec = getattr(request.node, "callspec", None)
    on_meta = callspec is not None and callspec.params.get("device") == "meta"
    with StrictDevices() if on_meta else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def meta_values_are_zero():
    """Let a function that must read a tensor's value into Python run on ``meta``.

    Inside the block, ``item()``, ``tolist()``, ``float()``, ``int()``, ``bool()`` (and ``__index__``) and
    ``cpu()`` of a *meta* tensor return zeros (``False``) instead of raising; tensors on other devices are untouched.
    Every op before and after such a read still runs on meta, so a CPU tensor meeting a meta one still
    fails. Not checked: the values (all zero, so a data-dependent branch always takes the same arm:
    ``if bad.any(): raise`` never fires, ``if not ok.all(): raise`` always does), and ops whose output
    shape depends on the data (``nonzero``, boolean-mask indexing, ``bincount``), which meta cannot run
    at all. Use it only around calls that end in such a read (a metric's float) or that check the values
    of their input; reads inside C++ ops (``torch.allclose``) are not intercepted.
    """
    zeros = {
        "item": lambda t: torch.zeros((), dtype=t.dtype).item(),
        "tolist": lambda t: torch.zeros(t.shape, dtype=t.dtype).tolist(),
        "__bool__": lambda t: False,
        "__float__": lambda t: 0.0,
        "__int__": lambda t: 0,
        "__index__": lambda t: 0,
        "cpu": lambda t, *args, **kwargs: torch.zeros(t.shape, dtype=t.dtype),  # a result brought to show
    }
    saved = {name: torch.Tensor.__dict__.get(name) for name in zeros}

    def reader(name, zero):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            return zero(self) if self.device.type == "meta" else original(self, *args, **kwargs)

        return read

    try:
        for name, zero in zeros.items():
            setattr(torch.Tensor, name, reader(name, zero))
        yield
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def test_strict_devices():
    """meta alone lets a matrix product with a CPU tensor through; the strict mode does not."""
    m, c = torch.ones(3, 2, device="meta"), torch.ones(2, 2)
    assert (m @ c).device.type == "meta"
    with StrictDevices():
        assert (m * torch.tensor(2.0)).device.type == "meta"  # a 0-dim CPU tensor is a number
        m[:1] = c[:1]  # item assignment copies across devices
        with pytest.raises(RuntimeError, match="mixes tensors"):
            m @ c
        with pytest.raises(RuntimeError, match="mixes tensors"):
            m[:, 1:] += c[:1, :1].expand(3, 1)


def test_meta_values_are_zero_is_scoped():
    """The context manager answers only for meta tensors, and only inside its block."""
    m = torch.ones(2, device="meta")
    with meta_values_are_zero():
        assert m.sum().item() == 0 and m.tolist() == [0.0, 0.0] and not bool(m.sum()) and int(m[0]) == 0
        assert torch.tensor(3.0).item() == 3.0 and bool(torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="meta"):
        m.sum().item()


# ---------------------------------------------------------------------------------------------
# Inputs (made on the CPU with fixed seeds, then moved) and the comparison with a CPU run
# ---------------------------------------------------------------------------------------------


def mixture() -> GaussianMixture:
    return GaussianMixture([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], stds=0.3, weights=[0.5, 0.3, 0.2])


def points(device, n=B, seed=0, dtype=torch.float32) -> torch.Tensor:
    """Data from :func:`mixture`, the same on every device."""
    return mixture().sample(n, torch.Generator().manual_seed(seed), dtype).to(device)


def noise(device, n=B, seed=1, scale=1.0) -> torch.Tensor:
    return (scale * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))).to(device)


def times(device, n=B, seed=2, lo=0.05, hi=0.95, dtype=torch.float32) -> torch.Tensor:
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (lo + (hi - lo) * u).to(device, dtype)


def tiny(device, cls=MLP, **kwargs):
    """A small network, initialised the same on every device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(**({"dim": 2, "hidden": 16, "depth": 2, "time_dim": 8} | kwargs)).to(device)


def leaves(out) -> list:
    if isinstance(out, dict):
        return [x for v in out.values() for x in leaves(v)]
    if isinstance(out, (tuple, list)):
        return [x for v in out for x in leaves(v)]
    return [out]


def on(device: str, out):
    """Every tensor in ``out`` (nested dicts, tuples, lists) lives on ``device``."""
    for x in leaves(out):
        if torch.is_tensor(x):
            assert x.device.type == device, f"a result lives on {x.device}, not {device}"


def same(device: str, run, how: str = "exact", rtol: float = 1e-4, atol: float = 1e-5):
    """``run(device)``, with its results on ``device``; on a real device also compared with ``run("cpu")``.

    ``how``: ``"exact"`` for deterministic paths (close within ``rtol``, ``atol``); ``"law"`` for
    samples (per-coordinate means and standard deviations within 6 standard errors); ``"mean"`` for a
    Monte Carlo scalar (8 runs per device, means within 6 standard errors plus ``rtol``, ``atol``).
    """
    out = run(device)
    on(device, out)
    if device == "meta":  # no values to compare
        return out
    if how == "exact":
        torch.testing.assert_close([x.cpu() for x in leaves(out)], leaves(run("cpu")), rtol=rtol, atol=atol)
    elif how == "law":
        for x, y in zip(leaves(out), leaves(run("cpu"))):
            x, y = x.cpu().double().flatten(1), y.double().flatten(1)
            se_mean = (x.var(0) / len(x) + y.var(0) / len(y)).sqrt()
            assert ((x.mean(0) - y.mean(0)).abs() <= 6 * se_mean + atol).all()
            se_std = (x.var(0) / (2 * len(x)) + y.var(0) / (2 * len(y))).sqrt()
            assert ((x.std(0) - y.std(0)).abs() <= 6 * se_std + 0.05 * y.std(0) + atol).all()
    elif how == "mean":
        ours, ref = (torch.stack([run(dev).double().cpu() for _ in range(8)]) for dev in (device, "cpu"))
        se = (ours.var() / 8 + ref.var() / 8).sqrt()
        assert (ours.mean() - ref.mean()).abs() <= 6 * se + rtol * ref.mean().abs() + atol, (ours, ref)
    return out


def check_states(device):
    """A sampler callback that checks every intermediate state."""

    def callback(i, t, x):
        assert x.device.type == device, f"state {i} lives on {x.device}"

    return callback


# ---------------------------------------------------------------------------------------------
# Schedules and the oracle
# ---------------------------------------------------------------------------------------------

SCHEDULES = {
    "linear": Linear(),
    "cosine": Cosine(),
    "sigmoid": Sigmoid(),
    "ve": VarianceExploding(sigma_max=4.0),
    "subvp": SubVP(),
}


def learned(device) -> L.LearnedSchedule:
    return L.LearnedSchedule(features=8, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_schedules(device):
    def run(dev):
        t = times(dev, 7, dtype=torch.float64)
        out = {}
        for name, sched in {**SCHEDULES, "learned": learned(dev)}.items():
            lam = sched.log_snr(t)
            out[name] = (
                sched.alpha(t),
                sched.sigma(t),
                sched.alpha_bar(t),
                sched.snr(t),
                sched.t_from_log_snr(lam),
                sched.transition(t, t / 2),
                sched.drift_diffusion(t),
            )
        sched = learned(dev)  # a module: its values at Python times live on its device
        out["learned at python times"] = (
            sched.alpha(0.5),
            sched.drift_diffusion(0.3),
            sched.t_from_log_snr(-1.0),
        )
        return out

    same(device, run, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_oracle(device):
    def run(dev):
        x, t = points(dev, seed=5) * 1.5, times(dev)
        out = {}
        for where, mix in (("cpu mixture", mixture()), ("moved mixture", mixture().to(dev))):
            for name in ("linear", "ve"):
                oracle = MixtureOracle(mix, SCHEDULES[name])
                den = oracle.denoiser()
                for when in (0.5, t):
                    key = f"{where}, {name}, t {'per sample' if torch.is_tensor(when) else when}"
                    out[key] = [oracle.log_prob(x, when), oracle.score(x, when), oracle.x0(x, when)]
                    out[key] += [den.x0(x, when), den.eps(x, when), den.v(x, when), den.score(x, when)]
            out[where] = (mix.log_prob(x), mix.score(x))
        assert all(v.dtype == torch.float32 for v in leaves(out))  # float32 in, float32 out
        return out

    same(device, run, rtol=1e-4, atol=1e-4)
    # a moved mixture draws on its device, from the generator it is given (meta ignores its device)
    gen = None if device == "meta" else torch.Generator(device).manual_seed(0)
    same(device, lambda dev: mixture().to(dev).sample(B, gen if dev == device else None), how="law")


# ---------------------------------------------------------------------------------------------
# Losses: a tiny network on the device, generator=None; the loss and every gradient stay there
# ---------------------------------------------------------------------------------------------


def _oracle_denoiser(dev, sched=SCHEDULES["linear"]) -> Denoiser:
    return MixtureOracle(mixture().to(dev), sched).denoiser()


def _pixels(dev, bins=16):
    """Points on the pixel grid ``-1 + 2k / (bins - 1)``, for the discretized decoder."""
    k = torch.randint(0, bins, (B, 2), generator=torch.Generator().manual_seed(3))
    return (-1 + 2 * k / (bins - 1)).float().to(dev)


LIN, VE, COSINE = SCHEDULES["linear"], SCHEDULES["ve"], SCHEDULES["cosine"]


def at(dev, t=0.3):
    return torch.tensor(t, device=dev)


def _consistency(net, dev):
    cf = acceleration.ConsistencyFunction(net, LIN)
    grid = samplers.time_grid(LIN, 4, t_min=cf.t_min)
    return acceleration.consistency_distillation_loss(_oracle_denoiser(dev), grid)(cf, points(dev))


def _hybrid_discretized(net, dev):
    with meta_values_are_zero():  # the discretized decoder checks that x lies on the pixel grid
        return L.hybrid_loss(LIN, 10, decoder="discretized", bins=16)(net, _pixels(dev))


LOSSES = {  # name: (net, dev) -> loss, with net = tiny(dev) (a LearnedVarianceMLP for the hybrid loss)
    "ddpm.simple_loss eps": lambda net, dev: ddpm.simple_loss(LIN)(net, points(dev)),
    "ddpm.simple_loss x0": lambda net, dev: ddpm.simple_loss(LIN, prediction="x0")(net, points(dev)),
    "ddpm.simple_loss v": lambda net, dev: ddpm.simple_loss(COSINE, prediction="v")(net, points(dev)),
    "score.score_matching_loss sigma2": lambda net, dev: score.score_matching_loss(VE)(net, points(dev)),
    "score.score_matching_loss likelihood": lambda net, dev: score.score_matching_loss(
        COSINE, weighting="likelihood"
    )(net, points(dev)),
    "score.score_matching_loss importance": lambda net, dev: score.score_matching_loss(
        LIN, weighting="likelihood", importance=True, prediction="score"
    )(net, points(dev)),
    "score.score_matching_loss none": lambda net, dev: score.score_matching_loss(
        SCHEDULES["subvp"], weighting="none"
    )(net, points(dev)),
    "score.explicit_score_matching": lambda net, dev: score.explicit_score_matching(
        net(x := points(dev), at(dev)), mixture().to(dev).score(x)
    ).mean(),
    "score.denoising_score_matching": lambda net, dev: score.denoising_score_matching(
        net(points(dev), at(dev)), noise(dev), LIN.sigma(at(dev))
    ).mean(),
    "score.implicit_score_matching": lambda net, dev: score.implicit_score_matching(
        lambda x: net(x, at(dev)), points(dev)
    ).mean(),
    "score.sliced_score_matching": lambda net, dev: score.sliced_score_matching(
        lambda x: net(x, at(dev)), points(dev), 2
    ).mean(),
    "likelihood.hybrid_loss": lambda net, dev: L.hybrid_loss(LIN, 10)(net, points(dev)),
    "likelihood.hybrid_loss discretized": _hybrid_discretized,
    "likelihood.vdm_loss": lambda net, dev: L.vdm_loss(L.VDM(net, LIN), points(dev)),
    "likelihood.diffusion_loss uniform": lambda net, dev: L.diffusion_loss(
        Denoiser(net, LIN), points(dev), t_min=1e-3, n_t=2, time_sampling="uniform"
    ).mean(),
    "likelihood.diffusion_loss importance": lambda net, dev: L.diffusion_loss(
        Denoiser(net, VE), points(dev), t_min=0.0, n_t=2
    ).mean(),
    "acceleration.progressive_distillation_loss": lambda net, dev: acceleration.progressive_distillation_loss(
        _oracle_denoiser(dev), 2, prediction="v"
    )(net, points(dev)),
    "acceleration.consistency_distillation_loss": _consistency,
}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("device", DEVICES)
def test_losses(device, name):
    def run(dev):
        model = tiny(dev, L.LearnedVarianceMLP) if name.startswith("likelihood.hybrid_loss") else tiny(dev)
        loss = LOSSES[name](model, dev)
        assert loss.ndim == 0
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads, "no gradient reached the model"
        on(dev, grads)
        return loss.detach()

    same(device, run, how="mean", rtol=1e-3)


LEARNED_ON_META = pytest.param(
    "meta", marks=pytest.mark.skip(reason="a learned schedule is read at Python times: float(), .cpu()")
)


@pytest.mark.parametrize("device", [LEARNED_ON_META, CUDA])
def test_learned_schedule(device):
    """VDM with its learned schedule, and samplers on its time grids. The bounds check the schedule at a
    Python time (``float()``) and the grids are built on the CPU, so this runs on CUDA only; the
    schedule's own methods are checked on meta in :func:`test_schedules`."""

    def run(dev):
        model = L.VDM(tiny(dev), learned(dev))
        loss = L.vdm_loss(model, points(dev))
        loss.backward()
        on(dev, [p.grad for p in model.parameters()])
        return loss.detach()

    same(device, run, how="mean", rtol=1e-3)

    def sample(dev):
        sched = learned(dev)
        den = Denoiser(tiny(dev), sched)  # an untrained network: only the path is checked
        return [
            spec.fn(den, noise(dev), samplers.time_grid(sched, 4, spec.grid), **spec.options)
            for name, spec in samplers.SAMPLERS.items()
            if name not in STOCHASTIC
        ]

    same(device, sample, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Samplers: the oracle as the network, x_T on the device, a CPU time grid, a few steps
# ---------------------------------------------------------------------------------------------

STOCHASTIC = {"ddim_eta1", "heun_churn", "adaptive_sde"}
OTHER_SAMPLERS = {  # name: (sampler, deterministic)
    "ddpm.sample_ancestral": (ddpm.sample_ancestral, False),
    "ddpm.sample_ancestral beta": (partial(ddpm.sample_ancestral, variance="beta"), False),
    "sde.sample_euler_maruyama": (sde.sample_euler_maruyama, False),
    "sde.sample_reverse_diffusion": (sde.sample_reverse_diffusion, False),
    "sde.sample_pc": (sde.sample_pc, False),
    "sde.sample_pc euler_maruyama": (partial(sde.sample_pc, predictor="euler_maruyama"), False),
    "sde.sample_pf_ode": (sde.sample_pf_ode, True),
    "sde.sample_pf_ode heun": (partial(sde.sample_pf_ode, method="heun"), True),
    "score.sample_annealed_langevin": (partial(score.sample_annealed_langevin, n_steps=2), False),
}


def _start(dev, sched):
    return noise(dev, scale=float(sched.sigma(1.0)) if isinstance(sched, VarianceExploding) else 1.0)


@pytest.mark.parametrize("schedule", ["linear", "ve"])
@pytest.mark.parametrize("name", list(samplers.SAMPLERS) + list(OTHER_SAMPLERS))
@pytest.mark.parametrize("device", DEVICES)
def test_samplers(device, name, schedule):
    sched = SCHEDULES[schedule]
    if name in samplers.SAMPLERS:
        spec = samplers.SAMPLERS[name]
        fn, grid, exact = partial(spec.fn, **spec.options), spec.grid, name not in STOCHASTIC
    else:
        (fn, exact), grid = OTHER_SAMPLERS[name], "uniform"
    if name == "adaptive_sde" and device == "meta":
        pytest.skip("its unfinished samples are a data-dependent nonzero: CUDA only (test_host_solvers)")
    ts = samplers.time_grid(sched, 4, grid)

    def run(dev):
        x = fn(_oracle_denoiser(dev, sched), _start(dev, sched), ts, callback=check_states(dev))
        assert x.dtype == torch.float32
        return x

    same(device, run, "exact" if exact else "law", rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_processes_and_steps(device):
    """The pieces of the chapters' chains: forward samples, posteriors, drifts, one-step helpers."""
    tables = ddpm_tables(LIN, 5)

    def deterministic(dev):
        x0, eps, t = points(dev), noise(dev), times(dev)
        x_t = ddpm.q_sample(LIN, x0, t, eps)
        den = _oracle_denoiser(dev)
        return {
            "q_sample": (x_t, ddpm.q_sample(VE, x0, 0.5, eps)),
            "posterior, scalar times": ddpm.posterior(LIN, x_t, x0, 0.5, 0.4),
            "posterior, per-sample times": ddpm.posterior(LIN, x_t, x0, t, t / 2),
            "posterior_mean_from_eps": ddpm.posterior_mean_from_eps(LIN, x_t, eps, t, t / 2),
            "gaussian_kl": ddpm.gaussian_kl(x0, 0.5, x_t, t),
            "gaussian_nll": ddpm.gaussian_nll(x0, x_t, 0.3),
            "reverse_drift": (sde.reverse_drift(den, x_t, 0.5), sde.pf_ode_drift(den, x_t, t)),
            "distillation_target": acceleration.distillation_target(den, x_t, t, t * 0.75, t / 2),
            "weighting": score.weighting(COSINE, t, "likelihood"),
        }

    def stochastic(dev):
        x0, den = points(dev), _oracle_denoiser(dev)
        up = torch.linspace(0, 1, 5, dtype=torch.float64)
        return {
            "q_sample_chain": ddpm.q_sample_chain(tables, x0)[-1],
            "vlb_terms": ddpm.vlb_terms(den, x0, 5),
            "sde.simulate_forward": sde.simulate_forward(LIN, x0, up)[-1],
            "langevin_correct": sde.langevin_correct(den, x0, 0.2, n_steps=2),
            "score.langevin": score.langevin(partial(den.score, t=0.2), x0, step_size=0.01, n_steps=2),
            "ccdf_start": samplers.ccdf_start(LIN, x0, 0.5),
            "uniform_dequantize": _dequantize(dev),
        }

    same(device, deterministic, rtol=1e-4, atol=1e-4)
    same(device, stochastic, "law")


def _dequantize(dev):
    with meta_values_are_zero():  # it checks that x lies on the pixel grid
        y, log_volume = L.uniform_dequantize(_pixels(dev), bins=16)
    on(dev, log_volume)
    return y


@pytest.mark.parametrize("device", DEVICES)
def test_cld(device):
    damped = cld.CLD()

    def run(dev):
        mix = mixture().to(dev)
        marginal = damped.marginal(mix, 0.5)
        on(dev, (marginal.means, marginal.covs, marginal.weights))
        u_T = damped.equilibrium(B, 2, device=dev)
        u = cld.sample_cld(
            damped,
            lambda u, t: damped.marginal(mix, float(t)).score(u),
            u_T,
            torch.linspace(1, 0, 5),
            callback=check_states(dev),
        )
        return {
            "forward": cld.simulate_forward(damped, points(dev), torch.linspace(0, 1, 5))[-1],
            "marginal": marginal.sample(B, dtype=torch.float32),
            "reverse": u,
        }

    same(device, run, "law")


# ---------------------------------------------------------------------------------------------
# Likelihood: bounds, variances, divergences (the PF-ODE likelihood itself: test_host_solvers)
# ---------------------------------------------------------------------------------------------


def _analytic_bound(dev, estimator):
    den, x0 = _oracle_denoiser(dev), points(dev)
    table = L.analytic_dpm_variances(den, points(dev, seed=7), 5, estimator=estimator)
    on(dev, table)
    with meta_values_are_zero():  # discrete_vlb checks that the table's variances are positive
        return L.discrete_vlb(den, x0, 5, variance=table).total.mean()


def _discretized_bound(dev):
    with meta_values_are_zero():  # the discretized decoder checks that x lies on the pixel grid
        return L.discrete_vlb(
            _oracle_denoiser(dev), _pixels(dev), 5, decoder="discretized", bins=16
        ).total.mean()


def _hutchinson(dev, kind):
    x, den = points(dev), _oracle_denoiser(dev)
    probe = L.hutchinson_probe(x.shape, kind, dtype=x.dtype, device=dev)
    on(dev, probe)
    drift, div = L.divergence(lambda z: sde.pf_ode_drift(den, z, 0.5), x, probe)
    on(dev, drift)
    return div.mean()


def _endpoint_invariance(dev):
    with meta_values_are_zero():  # it returns Python floats
        out = L.endpoint_invariance(_oracle_denoiser(dev), points(dev), COSINE, t_eps=1e-3, n_t=2)
    assert isinstance(out["own"][0], float)
    return torch.tensor(out["own"][0], device=dev)  # to compare the Monte Carlo values on CUDA


LIKELIHOODS = {  # name: dev -> a Monte Carlo (or exact) scalar on dev
    "discrete_vlb beta": lambda dev: L.discrete_vlb(
        _oracle_denoiser(dev), points(dev), 5, variance="beta"
    ).total.mean(),
    "discrete_vlb betatilde": lambda dev: L.discrete_vlb(_oracle_denoiser(dev), points(dev), 5).total.mean(),
    "discrete_vlb analytic score": partial(_analytic_bound, estimator="score"),
    "discrete_vlb analytic residual": partial(_analytic_bound, estimator="residual"),
    "discrete_vlb learned variance": lambda dev: L.discrete_vlb(
        (net := tiny(dev, L.LearnedVarianceMLP)).denoiser(LIN), points(dev), 5, variance=net.fraction
    ).total.mean(),
    "discrete_vlb discretized": _discretized_bound,
    "continuous_vlb": lambda dev: L.continuous_vlb(_oracle_denoiser(dev), points(dev), n_t=2).total.mean(),
    "continuous_vlb ve": lambda dev: L.continuous_vlb(
        _oracle_denoiser(dev, VE), points(dev), t_eps=0.0, time_sampling="uniform"
    ).total.mean(),
    "continuous_vlb transferred": lambda dev: L.continuous_vlb(
        L.transfer_by_log_snr(_oracle_denoiser(dev), COSINE), points(dev), t_eps=1e-3
    ).total.mean(),
    "prior_kl, prior_log_prob": lambda dev: (
        L.prior_kl(VE, points(dev)) + L.prior_log_prob(LIN, noise(dev))
    ).mean(),
    "divergence exact": lambda dev: L.divergence(
        lambda z: sde.pf_ode_drift(_oracle_denoiser(dev), z, 0.5), points(dev)
    )[1].mean(),
    "divergence rademacher": partial(_hutchinson, kind="rademacher"),
    "divergence gaussian": partial(_hutchinson, kind="gaussian"),
    "endpoint_invariance": _endpoint_invariance,
}


@pytest.mark.parametrize("name", LIKELIHOODS)
@pytest.mark.parametrize("device", DEVICES)
def test_likelihood(device, name):
    same(device, LIKELIHOODS[name], "mean", rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Metrics (Python numbers, converted once at the end) and learned acceleration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_metrics(device):
    def run(dev):
        x, y = points(dev), points(dev, seed=9) + torch.tensor([1.0, 0.0], device=dev)
        with meta_values_are_zero():  # each returns Python numbers
            out = {
                "sliced_wasserstein": metrics.sliced_wasserstein(x, y, 1024),
                "energy_distance": metrics.energy_distance(x, y),
                "mode_coverage": metrics.mode_coverage(y, mixture()),
                "mode_coverage, moved mixture": metrics.mode_coverage(x, mixture().to(dev))
                if dev != "meta"  # its isotropy check (torch.allclose) reads the mixture's values
                else None,
                "cross_entropy": metrics.cross_entropy(x, mixture().to(dev).log_prob),
            }
        assert all(isinstance(v, float) for k, v in out.items() if k in ("energy_distance", "cross_entropy"))
        return out

    out = run(device)
    if device != "meta":
        ref = run("cpu")
        assert out["sliced_wasserstein"] == pytest.approx(
            ref["sliced_wasserstein"], rel=0.1
        )  # own projections
        for key in ("energy_distance", "cross_entropy"):
            assert out[key] == pytest.approx(ref[key], rel=1e-6)
        for key in ("mode_coverage", "mode_coverage, moved mixture"):  # a sample may sit on a threshold
            assert (out[key]["modes"], out[key]["n_modes"]) == (ref[key]["modes"], ref[key]["n_modes"])
            assert out[key]["near"] == pytest.approx(ref[key]["near"], abs=2 / B)
            assert out[key]["weights"] == pytest.approx(ref[key]["weights"], abs=2 / B)


@pytest.mark.parametrize("device", DEVICES)
def test_acceleration(device):
    grid = torch.linspace(0, 1, 6, dtype=torch.float64)

    def bound(dev):
        with meta_values_are_zero():  # the costs' prior term, the path and its bound are Python numbers
            costs = acceleration.vlb_step_costs(_oracle_denoiser(dev), points(dev), grid)
            on(dev, costs.jump)
            _, best = acceleration.optimal_subsequence(costs, 2)  # (on meta its path is all zeros)
            assert isinstance(best, float) and isinstance(
                acceleration.path_bound(costs, grid[[5, 2, 0]]), float
            )
        return torch.where(costs.jump.isfinite(), costs.jump, 0).sum()

    def sample(dev):
        prior = acceleration.GaussianPrior(
            torch.zeros(2, dtype=torch.float64, device=dev),
            torch.eye(2, dtype=torch.float64, device=dev),
            0.8,
        )
        den, ts = _oracle_denoiser(dev), samplers.time_grid(LIN, 3, t_max=0.8)
        cf = acceleration.ConsistencyFunction(tiny(dev), LIN)
        out = {
            "prior": prior.sample(B),
            "sample_truncated": acceleration.sample_truncated(
                den, prior, (B, 2), ts, callback=check_states(dev)
            ),
            "sample_consistency": acceleration.sample_consistency(cf, noise(dev), [1.0, 0.5, 0.0]),
        }
        if dev != "meta":  # torch.cov has no meta kernel
            fitted = acceleration.fit_gaussian_prior(LIN, points(dev), 0.8)
            on(dev, (fitted.mean, fitted.cov))
            out["fitted prior"] = fitted.sample(B)
        return out

    same(device, bound, "mean", rtol=1e-3)
    same(device, sample, "law")


# ---------------------------------------------------------------------------------------------
# What goes through scipy, or needs data-dependent shapes: CUDA only; on the CPU, dtype and device kept
# ---------------------------------------------------------------------------------------------


def _host_solvers(dev):
    den, x = _oracle_denoiser(dev), points(dev, n=64)
    x_T, nfe = sde.solve_pf_ode(den, x, 1e-3, 1.0, rtol=1e-5, atol=1e-5)
    path, _ = sde.solve_pf_ode(den, x_T, 1.0, 0.5, t_eval=[1.0, 0.75, 0.5], rtol=1e-5, atol=1e-5)
    exact = L.ode_log_likelihood(den, x, t_eps=1e-3, rtol=1e-5, atol=1e-5)
    gen = torch.Generator(dev).manual_seed(0)
    hutchinson = L.ode_log_likelihood(
        den, x, t_eps=1e-3, trace="rademacher", generator=gen, rtol=1e-5, atol=1e-5
    )
    info = {}
    adaptive = samplers.sample_adaptive_sde(
        den, noise(dev), samplers.time_grid(LIN, 1), info=info, callback=check_states(dev)
    )
    assert info["nfe"] > 0
    return {
        "solve_pf_ode": (x_T, path),
        "ode_log_likelihood": (exact.log_prob, exact.prior_log_prob, exact.delta, exact.x_T),
        "hutchinson": hutchinson.log_prob,
        "adaptive_sde": adaptive,
    }


@pytest.mark.parametrize("device", [CUDA])
def test_host_solvers(device):
    out = _host_solvers(device)
    on(device, out)
    ref = _host_solvers("cpu")
    deterministic = [out["solve_pf_ode"], out["ode_log_likelihood"]]
    expected = [ref["solve_pf_ode"], ref["ode_log_likelihood"]]
    torch.testing.assert_close(
        [x.cpu() for x in leaves(deterministic)], leaves(expected), rtol=1e-3, atol=1e-3
    )
    # a Hutchinson estimate per sample, unbiased for the exact value: compared on average
    diff = (out["hutchinson"].cpu() - ref["ode_log_likelihood"][0]).double()
    assert diff.mean().abs() <= 6 * diff.std() / math.sqrt(len(diff)) + 1e-3
    same(device, lambda dev: out["adaptive_sde"] if dev == device else ref["adaptive_sde"], "law")


def test_host_solvers_keep_dtype_and_device_on_cpu():
    """float32 in, float32 out (the log-densities in float64), on the input's device."""
    out = _host_solvers("cpu")
    on("cpu", out)
    assert out["solve_pf_ode"][0].dtype == out["solve_pf_ode"][1].dtype == torch.float32
    assert out["solve_pf_ode"][1].shape == (3, 64, 2)
    assert out["ode_log_likelihood"][3].dtype == torch.float32
    assert out["ode_log_likelihood"][0].dtype == out["hutchinson"].dtype == torch.float64
    assert out["adaptive_sde"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# The trainer and the image-training pieces
# ---------------------------------------------------------------------------------------------


def _train_run(dev, data, **config):
    from dmlib.train import TrainConfig, train

    config = dict(steps=3, batch_size=8, check_every=1, progress=False, device=dev) | config
    simple = ddpm.simple_loss(LIN)
    loss = lambda m, b, g: simple(m, b if torch.is_tensor(b) else b[0], g)  # noqa: E731
    result = train(tiny("cpu"), data, loss, TrainConfig(**config))
    return result


@pytest.mark.parametrize("source", ["tensor", "loader"])
@pytest.mark.parametrize("device", DEVICES)
def test_training_steps(device, source, tmp_path):
    """Training steps (loss, backward, clipping, AdamW, EMA, warm-up, accumulation, the NaN check and the
    JSONL log) run where the model is sent, with data from a CPU tensor or a DataLoader of CPU batches."""
    from torch.utils.data import DataLoader, TensorDataset

    x = points("cpu", 64)
    data = (
        x if source == "tensor" else DataLoader(TensorDataset(x), batch_size=8, generator=torch.Generator())
    )
    with meta_values_are_zero() if device == "meta" else contextlib.nullcontext():
        result = _train_run(device, data, warmup_steps=2, accumulation=2, log=str(tmp_path / "log.jsonl"))
    on(device, [*result.model.parameters(), *result.ema.parameters()])
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_image_training_pieces(device):
    """dmlib.train_images' batch preparation (scale, pad, flip) and class-conditional loss run on the device."""
    from dmlib import train_images
    from dmlib.nets import ADMUNet

    cfg = train_images.DEFAULTS | {"dataset": "digits", "out": "-", "pad_to": 16, "hflip": True}
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8).to(device)
    labels = torch.tensor([0, 1, 2, 1]).to(device)
    g = None if device == "meta" else torch.Generator(device=device).manual_seed(0)
    x = train_images.prepare(images, cfg, g)
    assert x.shape == (4, 1, 16, 16) and x.dtype == torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ADMUNet(in_channels=1, image_size=16, base=16, channel_mults=(1, 2), groups=8, num_classes=3)
    loss = train_images.make_loss(cfg, num_classes=3)(net.to(device), (images, labels), g)
    loss.backward()
    on(device, [x, loss, *[p.grad for p in net.parameters()]])


@pytest.mark.parametrize("device", [CUDA])
def test_checkpoint_moves_between_cpu_and_cuda(device, tmp_path):
    """A CPU checkpoint continues on CUDA and back (the generators restart from (seed, rank, step):
    a CPU and a CUDA generator are different algorithms); twice the same trip gives the same weights."""
    finals = []
    for trip in ("a", "b"):
        ckpt = str(tmp_path / f"{trip}.safetensors")
        for steps, dev in ((4, "cpu"), (8, device), (12, "cpu")):
            result = _train_run(dev, points("cpu", 64), steps=steps, checkpoint=ckpt, checkpoint_every=4)
            on(dev, list(result.model.parameters()))
        finals.append(result.model.state_dict())
        assert torch.isfinite(result.losses).all() and result.losses.shape == (12,)
    for name, value in finals[0].items():
        torch.testing.assert_close(finals[1][name], value, rtol=1e-4, atol=1e-5, msg=f"differs in {name}")
