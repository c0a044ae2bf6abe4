"""The image networks of chapter 11 (ADM U-Net, DiT) and the FLOP counter used to compare them."""

import collections
import inspect
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dmlib.nets import ADMUNet, DiT, count_parameters, describe, forward_flops
from dmlib.nets.adm import Attention

pytestmark = pytest.mark.usefixtures("one_thread")


def small_adm(**kw):
    return ADMUNet(**{**dict(in_channels=1, image_size=16, base=16, channel_mults=(1, 2), groups=4), **kw})


def small_dit(**kw):
    return DiT(**{**dict(in_channels=1, image_size=8, patch_size=2, hidden=32, depth=2, num_heads=2), **kw})


NETS = {"adm": small_adm, "dit": small_dit}
SIZE = {"adm": 16, "dit": 8}  # the image side each small net is built for


class DeviceSpy(TorchDispatchMode):
    """Records the operators that return a tensor on a device other than meta."""

    def __init__(self):
        super().__init__()
        self.strays = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(o, torch.Tensor) and o.device.type != "meta" for o in tree_leaves(out)):
            self.strays.append(str(func))
        return out


@torch.no_grad()
def unzero(net):
    """Randomize every all-zero parameter, so that every path of a fresh net matters."""
    for p in net.parameters():
        if not p.any():
            nn.init.normal_(p, std=0.1)
    return net


@pytest.mark.parametrize(
    "kw, shape",
    [
        (dict(image_size=28, channel_mults=(1, 2, 2), attention_resolutions=(14,)), (2, 1, 28, 28)),
        (dict(in_channels=3, out_channels=6, image_size=32, channel_mults=(1, 2, 2, 2)), (2, 6, 32, 32)),
        (dict(image_size=8, num_res_blocks=1, attention_resolutions=(), scale_shift=False), (2, 1, 8, 8)),
    ],
)
@pytest.mark.parametrize("scalar_t", [True, False])
def test_adm_output_shapes(kw, shape, scalar_t):
    net = small_adm(**kw)
    x = torch.randn(2, net.in_channels, shape[2], shape[3])
    assert net(x, torch.tensor(0.3) if scalar_t else torch.rand(2)).shape == shape


@pytest.mark.parametrize(
    "kw, shape",
    [
        (dict(image_size=28, out_channels=2), (2, 2, 28, 28)),
        (dict(in_channels=3, patch_size=4), (2, 3, 8, 8)),
    ],
)
@pytest.mark.parametrize("scalar_t", [True, False])
def test_dit_output_shapes(kw, shape, scalar_t):
    net = small_dit(**kw)
    x = torch.randn(2, net.in_channels, shape[2], shape[3])
    assert net(x, torch.tensor(0.3) if scalar_t else torch.rand(2)).shape == shape


@pytest.mark.parametrize("name", NETS)
def test_fresh_net_is_the_zero_function(name):
    net, x = NETS[name](), torch.randn(2, 1, SIZE[name], SIZE[name])
    assert torch.equal(net(x, torch.rand(2)), torch.zeros_like(x))  # zero-init output layer
    assert unzero(net)(x, torch.rand(2)).abs().min() > 0  # the input itself is not what makes it zero


@pytest.mark.parametrize("name", NETS)
def test_class_conditioning_and_null_class(name):
    net = unzero(NETS[name](num_classes=3))
    x, t = torch.randn(2, 1, SIZE[name], SIZE[name]), torch.rand(2)
    assert not torch.allclose(net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1])))
    assert torch.equal(net(x, t), net(x, t, torch.tensor([3, 3])))  # y=None is the null class


def test_adm_bad_inputs_are_named():
    net, x, t = small_adm(num_classes=3), torch.zeros(2, 1, 16, 16), torch.rand(2)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.zeros(2, 3, 16, 16), t)
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.zeros(2, 1, 15, 16), t)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        net(x, torch.rand(3))
    for y in (torch.tensor([0, -1]), torch.tensor([4, 0])):
        with pytest.raises(ValueError, match=r"\[0, 3\]"):
            net(x, t, y)
    with pytest.raises(ValueError, match="integer labels"):
        net(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_classes=None"):
        small_adm()(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[12\] are not among"):
        small_adm(attention_resolutions=(12,))  # 16 px, one halving: attention can only go at 16 or 8


def test_dit_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        small_dit()(torch.zeros(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="num_classes=None"):
        small_dit()(torch.zeros(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        small_dit(image_size=10, patch_size=4)


@pytest.mark.parametrize(
    "cls, kw",
    [
        (ADMUNet, dict(in_channels=3, out_channels=6, image_size=16, base=8, channel_mults=(1, 2), num_res_blocks=1,
                       attention_resolutions=(16,), dropout=0.1, num_heads=1, head_channels=4, groups=2,
                       num_classes=3, scale_shift=False)),
        (DiT, dict(in_channels=3, out_channels=6, image_size=8, patch_size=4, hidden=16, depth=1, num_heads=4,
                   mlp_ratio=2.0, num_classes=3)),
    ],
)  # fmt: skip
def test_from_config_rebuilds_the_net(cls, kw):
    net = unzero(cls(**kw)).eval()
    assert set(net.config) == set(inspect.signature(cls).parameters)  # every argument is recorded
    rebuilt = cls.from_config(json.loads(json.dumps(net.config))).eval()  # as a checkpoint stores it
    rebuilt.load_state_dict(net.state_dict())
    x, t, y = torch.randn(2, 3, kw["image_size"], kw["image_size"]), torch.rand(2), torch.tensor([0, 2])
    assert torch.equal(rebuilt(x, t, y), net(x, t, y))


@pytest.mark.parametrize("name", NETS)
def test_gradients_reach_every_parameter(name):
    net = unzero(NETS[name](num_classes=3))
    out = net(torch.randn(4, 1, SIZE[name], SIZE[name]), torch.rand(4), torch.tensor([0, 1, 2, 3]))
    (out * torch.randn_like(out)).sum().backward()
    # Every weight entry must matter, not just every tensor (a dropped shift leaves half a Linear
    # unused); biases only as a whole: softmax ignores the key bias, a shift shared by all keys.
    dead = [
        n
        for n, p in net.named_parameters()
        if p.grad is None or not (p.grad.all() if p.ndim > 1 else p.grad.any())
    ]
    assert not dead, f"no gradient reaches (part of) {dead}"


@pytest.mark.parametrize("name", NETS)
def test_forward_on_meta_device(name):
    """A tensor made on the CPU inside forward (a null label, a mask) would fail on a GPU. Meta
    tensors show it without one: most ops refuse to mix devices, and the spy catches the ops that
    do not (an embedding lookup accepts CPU indices for a meta table)."""
    net = NETS[name](num_classes=3).to("meta")
    x = torch.empty(2, 1, SIZE[name], SIZE[name], device="meta")
    for t, y in (
        (torch.rand(2, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")),
        (0.5, None),
    ):
        with DeviceSpy() as spy:
            out = net(x, t, y)
        assert out.device.type == "meta" and out.shape == x.shape
        assert not spy.strays, f"tensors made off the input's device by {spy.strays}"


@pytest.mark.parametrize("name", NETS)
def test_time_embedding_survives_bf16(name):
    """t = 0.500 and 0.501 are one bf16 number: a net that rounds t to x's dtype confuses the two steps."""
    net = unzero(NETS[name]()).to(torch.bfloat16)
    x = torch.randn(1, 1, SIZE[name], SIZE[name], dtype=torch.bfloat16)
    assert not torch.equal(net(x, torch.tensor([0.500])), net(x, torch.tensor([0.501])))


def test_fresh_dit_block_is_the_identity():
    block = small_dit().blocks[0]
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(block(x, c), x)  # adaLN-Zero: both gates start at zero
    assert not torch.equal(unzero(block)(x, c), x)


def test_dit_without_blocks_works_patch_by_patch():
    """Patchify and unpatchify must agree on where each patch lies: with no transformer block to mix
    tokens, changing one pixel changes the output in its own 2x2 patch and nowhere else."""
    net, x, t = unzero(small_dit(depth=0)), torch.randn(1, 1, 8, 8), torch.rand(1)
    x2 = x.clone()
    x2[0, 0, 5, 2] += 1.0  # in the patch of rows 4-5, columns 2-3
    changed = (net(x2, t) != net(x, t)).nonzero()[:, 2:]
    assert changed.tolist() == [[4, 2], [4, 3], [5, 2], [5, 3]]
    # and each patch knows where it is: on a constant image only the position embedding differs
    patches = net(torch.ones(1, 1, 8, 8), t).reshape(4, 2, 4, 2).permute(0, 2, 1, 3).reshape(16, 4)
    assert len(patches.unique(dim=0)) == 16


def test_attention_sits_at_the_requested_resolutions():
    net = ADMUNet(in_channels=3, base=8, channel_mults=(1, 2, 2, 2), attention_resolutions=(16,), groups=4)
    seen = collections.Counter()
    for m in net.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda m, inputs, out: seen.update([inputs[0].shape[-1]]))
    net(torch.randn(1, 3, 32, 32), torch.rand(1))
    # 2 res blocks down + 3 up at 16 px, and one in the middle at 32 / 2**3 = 4 px
    assert seen == {16: 5, 4: 1}


def test_linear_flops_are_two_per_multiply_add():
    n, a, b = 5, 7, 3
    assert forward_flops(nn.Linear(a, b), torch.randn(n, a)) == 2 * n * a * b
    assert count_parameters(nn.Linear(a, b)) == a * b + b


def test_fused_cpu_attention_is_counted():
    """PyTorch's counter alone counts the fused CPU attention kernel as 0 FLOPs."""
    q = torch.randn(2, 4, 16, 8)  # (batch, heads, tokens, head_dim), contiguous: the fused kernel runs
    assert forward_flops(F.scaled_dot_product_attention, q, q, q) == 2 * 2 * (2 * 4 * 16 * 16 * 8)
    net, x = small_adm(attention_resolutions=(16, 8)), torch.randn(2, 1, 16, 16)
    on_cpu = forward_flops(net, x, torch.rand(2))
    assert on_cpu == forward_flops(net.to("meta"), x.to("meta"), torch.rand(2))  # meta takes the unfused path


def test_dit_flops_scale_with_token_count():
    """Doubling the side at fixed patch size gives 4x the tokens: every per-token layer costs 4x,
    attention (quadratic in tokens) a bit more, the time MLP (per image) a bit less."""
    flops = []
    for size in (8, 16):
        net = DiT(in_channels=1, image_size=size, patch_size=2, hidden=128, depth=2, num_heads=4).to("meta")
        flops.append(forward_flops(net, torch.empty(2, 1, size, size, device="meta"), torch.rand(2)))
    assert 3.9 < flops[1] / flops[0] < 4.5
    row = describe(small_dit(), torch.randn(2, 1, 8, 8), torch.rand(2))
    assert row["params"] == count_parameters(small_dit())
    assert row["flops"] == pytest.approx(2 * row["gflops_per_sample"] * 1e9)


def test_published_sizes_are_reproduced():
    """DDPM's CIFAR-10 net (Ho et al. 2020, sec. 4: 35.7M parameters) and DiT on 32x32x4 latents
    (Peebles & Xie 2023, Table 4: XL/2 675M parameters; S/2 6.06 Gflops, which are multiply-adds,
    half our count). DiT keeps its positional embedding (256 tokens x 1152) as a frozen parameter; ours is a buffer."""
    latent = dict(in_channels=4, out_channels=8, image_size=32, patch_size=2, num_classes=1000)
    with torch.device("meta"):
        ddpm = ADMUNet(in_channels=3, base=128, channel_mults=(1, 2, 2, 2), attention_resolutions=(16,),
                       scale_shift=False)  # fmt: skip
        xl2 = DiT(hidden=1152, depth=28, num_heads=16, **latent)
        s2 = DiT(hidden=384, depth=12, num_heads=6, **latent)
    assert count_parameters(ddpm) == 35_746_307
    assert count_parameters(xl2) + 256 * 1152 == 675_129_632
    x, t, y = torch.empty(1, 4, 32, 32, device="meta"), torch.rand(1), torch.zeros(1, dtype=torch.long)
    assert forward_flops(s2, x, t, y.to("meta")) / 2 / 1e9 == pytest.approx(6.06, abs=0.005)
