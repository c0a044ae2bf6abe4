"""Image training throughput: dmlib's trainer vs a bare PyTorch loop vs diffusers' UNet2DModel loop, in one run.

    .venv/bin/python benchmarks/image_training.py                      # CPU: small images, ratios only
    .venv/bin/python benchmarks/image_training.py --size 32 --base 128 --batch 128 \\
        --precision bf16 --compile --steps 200                         # GPU: also images/s and MFU

Three loops do the same work per step (DDPM L_simple on the cosine schedule, AdamW, gradient
clipping at 1, an EMA of the weights, the same precision) on the same batches of random images:
  dmlib      dmlib.train.train with dmlib.nets.ADMUNet and a DataLoader
  bare       a hand-written loop with the same ADMUNet and the same DataLoader
  diffusers  the loop of diffusers' train_unconditional example: UNet2DModel (widths chosen to match
             ADMUNet's parameter count), DDPMScheduler.add_noise, EMAModel
Rounds alternate the loops so that drift in machine load hits all alike; the best round of each is
reported. Targets: dmlib >= 0.95 x bare; on a GPU, dmlib with bf16 + compile >= 1.3 x diffusers.
MFU = 3 x forward FLOPs (forward + backward ~ 3 forwards) x images/s over the device's peak dense
FLOPs for the precision; the peaks table holds the few GPUs whose datasheet numbers are known here.
diffusers is not a dependency of dmlib: ``pip install -c constraints.txt -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.utils.data import DataLoader

from dmlib import ddpm, get_schedule
from dmlib.data import image_loader
from dmlib.nets import ADMUNet
from dmlib.nets.flops import count_parameters, forward_flops
from dmlib.train import PRECISIONS, TrainConfig, train

# dense tensor-core peaks in TFLOPS (NVIDIA datasheets, SXM parts, without sparsity)
PEAK_TFLOPS = {
    "H200": {"bf16": 989, "fp16": 989, "fp32": 67},
    "H100": {"bf16": 989, "fp16": 989, "fp32": 67},
    "A100": {"bf16": 312, "fp16": 312, "fp32": 19.5},
}


def make_loader(args) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch * 8, args.channels, args.size, args.size, generator=g) * 2 - 1
    return image_loader(x, batch_size=args.batch, seed=1, pin_memory=args.device.type == "cuda")


def endless(loader):
    while True:
        yield from loader


def adm(args) -> ADMUNet:
    torch.manual_seed(0)
    return ADMUNet(
        in_channels=args.channels,
        image_size=args.size,
        base=args.base,
        channel_mults=(1, 2, 2),
        attention_resolutions=(args.size // 2,),
        groups=min(32, args.base // 4),
    )


def diffusers_unet(args, target_params: int):
    """diffusers' UNet2DModel with ADM's layout (2 blocks a level, attention at half resolution), its
    width chosen among multiples of 8 to match ``target_params``."""
    from diffusers import UNet2DModel

    def build(c):
        torch.manual_seed(0)
        return UNet2DModel(
            sample_size=args.size,
            in_channels=args.channels,
            out_channels=args.channels,
            block_out_channels=(c, 2 * c, 2 * c),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=min(32, c // 4),
        )

    widths = range(8, 4 * args.base + 1, 8)
    best = min(widths, key=lambda c: abs(count_parameters(build(c)) - target_params))
    return build(best)


def loss_on(schedule):
    return ddpm.simple_loss(schedule)


def autocast(args):
    dtype = PRECISIONS[args.precision]
    return torch.autocast(args.device.type, dtype=dtype, enabled=dtype is not None)


def run_dmlib(args, steps) -> float:
    config = TrainConfig(
        steps=steps,
        batch_size=args.batch,
        lr=1e-4,
        precision=args.precision,
        compile=args.compile,
        device=str(args.device),
        progress=False,
        check_every=steps,
    )
    result = train(adm(args), make_loader(args), loss_on(get_schedule("cosine")), config)
    return steps / result.seconds


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_bare(args, steps) -> float:
    """The same work as dmlib's trainer, written out: what a reader would write by hand."""
    model = adm(args).to(args.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    forward = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.precision == "fp16")
    g = torch.Generator(device=args.device).manual_seed(0)
    loss_fn, batches = loss_on(get_schedule("cosine")), endless(make_loader(args))
    params, ema_params = list(model.parameters()), list(ema.parameters())
    losses = torch.empty(steps, device=args.device)
    _sync(args.device)
    tic = time.perf_counter()
    for step in range(steps):
        x = next(batches).to(args.device, non_blocking=True)
        with autocast(args):
            loss = loss_fn(forward, x, g)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - min(0.999, (1 + step) / (10 + step)))
        losses[step] = loss.detach()
    assert torch.isfinite(losses).all()
    _sync(args.device)
    return steps / (time.perf_counter() - tic)


def run_diffusers(args, steps, target_params) -> float:
    """diffusers' examples/unconditional_image_generation loop, reduced to its work per step."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    model = diffusers_unet(args, target_params).to(args.device)
    ema = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True)
    forward = torch.compile(model) if args.compile else model
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.precision == "fp16")
    batches = endless(make_loader(args))
    _sync(args.device)
    tic = time.perf_counter()
    for _ in range(steps):
        x = next(batches).to(args.device, non_blocking=True)
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (x.shape[0],), device=x.device)
        with autocast(args):
            pred = forward(scheduler.add_noise(x, noise, t), t).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        ema.step(model.parameters())
    _sync(args.device)
    return steps / (time.perf_counter() - tic)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--base", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.device = torch.device(args.device)

    net = adm(args)
    x = torch.zeros(args.batch, args.channels, args.size, args.size)
    flops = forward_flops(net, x, torch.zeros(args.batch))
    params = count_parameters(net)
    loops = {"dmlib": lambda n: run_dmlib(args, n), "bare": lambda n: run_bare(args, n)}
    try:
        d_params = count_parameters(diffusers_unet(args, params))
        loops["diffusers"] = lambda n: run_diffusers(args, n, params)
    except ImportError:
        d_params = None
        print("diffusers is not installed: pip install -c constraints.txt -e '.[bench]' to compare with it")
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    print(
        f"device {name}, {torch.get_num_threads()} threads; {args.precision}, compile={args.compile}; "
        f"images {args.channels}x{args.size}x{args.size}, batch {args.batch}, {args.steps} steps x {args.rounds} rounds"
    )
    print(f"ADMUNet {params / 1e6:.2f}M parameters, {flops / args.batch / 1e9:.3f} GFLOPs per image forward")
    if d_params is not None:
        print(f"diffusers UNet2DModel {d_params / 1e6:.2f}M parameters")
    for run in loops.values():
        run(3)  # warm-up: allocator, kernels, compilation
    best = dict.fromkeys(loops, 0.0)
    for _ in range(args.rounds):
        for key, run in loops.items():
            best[key] = max(best[key], run(args.steps))
    peak = next((p for k, p in PEAK_TFLOPS.items() if k in name), {}).get(args.precision)
    for key, rate in best.items():
        images = rate * args.batch
        line = f"{key:10s} {rate:8.2f} steps/s  {images:9.1f} images/s"
        if key != "diffusers" and peak:
            line += f"  MFU {3 * flops / args.batch * images / (peak * 1e12):.1%}"
        print(line)
    print(f"ratio dmlib / bare      = {best['dmlib'] / best['bare']:.3f}  (target >= 0.95)")
    if "diffusers" in best:
        print(
            f"ratio dmlib / diffusers = {best['dmlib'] / best['diffusers']:.3f}  (GPU target, bf16 + compile: >= 1.3)"
        )


if __name__ == "__main__":
    main()
