import pytest
import torch

import dmlib
from dmlib.nets import MLP, UNet, timestep_embedding


@pytest.mark.parametrize("size", [8, 28, 32])
def test_unet_keeps_shape_at_every_resolution(size):
    net = UNet(in_channels=1, base=8)
    x = torch.randn(2, 1, size, size)
    assert net(x, torch.rand(2)).shape == x.shape


def test_unet_output_depends_on_time_after_training_step():
    """The zero-initialised output layer makes every output 0 at first; one real optimizer step on a
    time-dependent target must make the output depend on t (a broken time path stays constant)."""
    torch.manual_seed(0)
    net = UNet(base=8)
    x, t_lo, t_hi = torch.randn(4, 1, 8, 8), torch.full((4,), 0.1), torch.full((4,), 0.9)
    assert torch.equal(net(x, t_lo), net(x, t_hi))  # zero init: no dependence yet
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):  # the first step moves only the output layer; the second reaches time
        loss = ((net(x, t_lo) - 1) ** 2).mean() + ((net(x, t_hi) + 1) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(net(x, t_lo), net(x, t_hi), atol=1e-6)


def test_bad_shapes_named():
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        MLP()(torch.zeros(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet(base=8)(torch.zeros(1, 1, 10, 10), torch.rand(1))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        UNet(base=8)(torch.zeros(1, 3, 8, 8), torch.rand(1))


def test_embedding_distinguishes_adjacent_ddpm_steps():
    e = timestep_embedding(torch.tensor([500 / 1000, 501 / 1000]), 64)
    assert (e[0] - e[1]).abs().max() > 0.1


def test_profiles(monkeypatch):
    monkeypatch.setenv("DMLIB_PROFILE", "test")
    assert dmlib.budget(test=1, cpu=2, gpu=3) == 1
    monkeypatch.setenv("DMLIB_PROFILE", "CPU")
    assert dmlib.budget(test=1, cpu=2, gpu=3) == 2
    monkeypatch.setenv("DMLIB_PROFILE", "tpu")
    with pytest.raises(ValueError, match="'tpu' is not a profile"):
        dmlib.profile()
