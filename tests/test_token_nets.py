"""Token networks (dmlib.nets.tokens): the bidirectional denoiser and the causal baseline."""

import itertools
import math

import pytest
import torch
from test_device import StrictDevices

from dmlib.nets import CausalTokenModel, TokenDenoiser, ar_log_likelihood, ar_loss, ar_sample
from dmlib.nets.tokens import count_parameters
from dmlib.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

K, D = 5, 6


def tiny(cls, seed=0, dtype=torch.float64, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**({"K": K, "D": D, "width": 16, "depth": 2, "heads": 2} | kwargs)).to(dtype)


def tokens(n=4, ids=K, seed=1):
    return torch.randint(0, ids, (n, D), generator=torch.Generator().manual_seed(seed))


def test_causal_model_is_causal():
    """The logits at position i depend on the tokens before i and on no others."""
    model = tiny(CausalTokenModel)
    x = tokens()
    base = model(x)
    assert base.shape == (4, D, K) and base.dtype == torch.float64
    for j in range(D):
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % K
        out = model(y)
        torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1], rtol=0, atol=1e-12)
        if j < D - 1:  # every later position sees the change
            assert ((out[:, j + 1 :] - base[:, j + 1 :]).abs().amax(-1) > 1e-6).all()


def test_denoiser_shape_and_dependence_on_t_and_x():
    model = tiny(TokenDenoiser)
    x = tokens(ids=K + 1)  # the mask id K is an input
    x[0] = K  # one fully masked sequence
    t = torch.full((4,), 0.3, dtype=torch.float64)
    out = model(x, t)
    assert out.shape == (4, D, K) and out.dtype == torch.float64 and torch.isfinite(out).all()
    assert (model(x, t + 0.4) - out).abs().amax((1, 2)).min() > 1e-6  # every sequence depends on t
    torch.testing.assert_close(model(x, 0.3), out)  # a scalar time is one time for the batch
    y = x.clone()
    y[:, 0] = (y[:, 0] + 1) % (K + 1)
    # bidirectional: a change at position 0 reaches every position, the last included
    assert ((model(y, t) - out).abs().amax(-1) > 1e-6).all()


def test_parameter_counts_are_comparable():
    """The denoiser has a time MLP (2 (w^2 + w)) and a mask embedding row (w) more, the causal model a
    start embedding (w): they differ by 2 (w^2 + w), about 5% at the suggested text size."""
    w = 128
    den, ar = TokenDenoiser(93, 64, w, 3, 4), CausalTokenModel(93, 64, w, 3, 4)
    assert count_parameters(den) - count_parameters(ar) == 2 * (w * w + w)
    assert count_parameters(ar) == 627_293 and count_parameters(den) == 660_317
    assert den.config == ar.config == dict(K=93, D=64, width=w, depth=3, heads=4)
    assert count_parameters(TokenDenoiser.from_config(den.config)) == count_parameters(den)


def test_ar_log_likelihood_is_the_sum_of_conditionals():
    model = tiny(CausalTokenModel)
    x = tokens(8)
    ll = ar_log_likelihood(model, x)
    assert ll.shape == (8,) and ll.dtype == torch.float64
    # each conditional from its own forward pass, the tokens from position i on replaced by junk
    manual = torch.zeros(8, dtype=torch.float64)
    for i in range(D):
        junk = x.clone()
        junk[:, i:] = tokens(8, seed=10 + i)[:, i:]
        manual += model(junk)[:, i].log_softmax(-1).gather(1, x[:, i : i + 1]).squeeze(1)
    torch.testing.assert_close(ll, manual, rtol=0, atol=1e-10)
    # the mean next-token loss is minus the mean log-likelihood per token
    torch.testing.assert_close(ar_loss(model, x).double(), -ll.mean() / D, rtol=1e-6, atol=1e-6)


def test_ar_likelihood_normalizes_and_the_sampler_is_exact():
    """For K = 3, D = 3 the 27 sequences' probabilities sum to 1, and samples follow them."""
    model = tiny(CausalTokenModel, K=3, D=3, seed=2)
    everything = torch.tensor(list(itertools.product(range(3), repeat=3)))
    p = ar_log_likelihood(model, everything).exp()
    assert abs(p.sum().item() - 1) < 1e-12
    n = 20_000
    x = ar_sample(model, n, torch.Generator().manual_seed(0))
    assert x.shape == (n, 3) and x.dtype == torch.long
    counts = torch.bincount(x[:, 0] * 9 + x[:, 1] * 3 + x[:, 2], minlength=27).double()
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < 26 + 6 * math.sqrt(2 * 26), chi2
    seeded = ar_sample(model, 50, torch.Generator().manual_seed(7))
    assert torch.equal(seeded, ar_sample(model, 50, torch.Generator().manual_seed(7)))


def test_ar_model_learns_a_deterministic_pattern_with_the_trainer():
    """dmlib.train.train batches a LongTensor of sequences; the NLL of one fixed sequence goes to ~0."""
    pattern = torch.tensor([3, 1, 4, 1, 0, 2])
    data = pattern.repeat(64, 1)
    model = tiny(CausalTokenModel, dtype=torch.float32, width=32)
    before = -ar_log_likelihood(model, pattern[None]).item()
    assert before > 0.8 * D * math.log(K)  # about uniform at the start
    cfg = TrainConfig(steps=200, batch_size=16, lr=1e-2, device="cpu", progress=False, ema_decay=0.9)
    result = train(model, data, ar_loss, cfg)
    assert result.losses[-10:].mean() < 0.003
    with torch.no_grad():
        nll = -ar_log_likelihood(result.model, pattern[None]).item()
    assert 0 <= nll < 0.01, nll
    assert (ar_sample(result.model, 20, torch.Generator().manual_seed(0)) == pattern).all()


@pytest.mark.parametrize("cls", [TokenDenoiser, CausalTokenModel])
def test_token_nets_on_meta(cls):
    """Forward, loss, backward and (for the causal model) sampling create nothing on the CPU."""
    with StrictDevices():
        model = tiny(cls, dtype=torch.float32).to("meta")
        x = torch.zeros(3, D, dtype=torch.long, device="meta")
        if cls is TokenDenoiser:
            out = model(x, torch.rand(3, device="meta"))
            out.sum().backward()
            extra = [out]
        else:
            out = model(x)
            loss = ar_loss(model, x)
            loss.backward()
            extra = [out, loss, ar_log_likelihood(model, x), ar_sample(model, 2)]
    assert out.shape == (3, D, K)
    for y in extra + [p.grad for p in model.parameters()]:
        assert y.device.type == "meta"


def test_bad_inputs_are_refused():
    den, ar = tiny(TokenDenoiser), tiny(CausalTokenModel)
    x, t = tokens(), torch.full((4,), 0.5)
    with pytest.raises(ValueError, match="LongTensor"):
        den(x.float(), t)
    with pytest.raises(ValueError, match="LongTensor"):
        ar(x.int())
    with pytest.raises(ValueError, match=f"shape \\(B, {D}\\)"):
        den(x[:, :-1], t)
    with pytest.raises(ValueError, match=f"shape \\(B, {D}\\)"):
        ar(x[0])
    with pytest.raises(ValueError, match=f"0..{K}"):
        den(torch.full((2, D), K + 1), 0.5)  # the mask K is allowed, K + 1 is not
    with pytest.raises(ValueError, match=f"0..{K - 1}"):
        ar(torch.full((2, D), K))  # the causal model has no mask
    with pytest.raises(ValueError, match=f"0..{K}"):
        den(torch.full((2, D), -1), 0.5)
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        den(x, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="continuous time"):
        den(x, torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        den(x, 1.5)
    with pytest.raises(TypeError, match="CausalTokenModel"):
        ar_sample(den, 2)
    with pytest.raises(ValueError, match="heads"):
        TokenDenoiser(K, D, width=30, heads=4)
    with pytest.raises(ValueError, match="K must be"):
        CausalTokenModel(1, D)
