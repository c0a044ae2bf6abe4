"""dmlib's trainer vs a bare PyTorch loop on the same 2D MLP: steps/s of each and their ratio, in one run.

    .venv/bin/python benchmarks/trainer_overhead.py [--steps 1500] [--rounds 3]

Three loops train the same MLP (3x128) on eight Gaussians with the same DDPM loss and batch size:
  dmlib      dmlib.train.train (AdamW, gradient clipping, EMA, NaN checks, progress bar off)
  bare+same  a hand-written loop doing the same work (AdamW, clipping, EMA)
  bare       the shortest loop a reader would write (AdamW only)
Rounds alternate the three so that drift in machine load hits all of them alike; the best round of
each is reported. Target: dmlib >= 0.9 x bare+same.
"""

import argparse
import time

import torch

import dmlib
from dmlib import ddpm
from dmlib.data import eight_gaussians
from dmlib.nets import MLP
from dmlib.train import TrainConfig, train


def bare_loop(data, steps, batch, schedule, same_work):
    torch.manual_seed(0)
    model = MLP()
    ema = MLP().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    g = torch.Generator().manual_seed(0)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    tic = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        loss = ddpm.simple_loss(schedule)(model, data[idx], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if same_work:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if same_work:
            decay = min(0.999, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - decay)
    return steps / (time.perf_counter() - tic)


def dmlib_loop(data, steps, batch, schedule):
    torch.manual_seed(0)
    config = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, progress=False, device="cpu")
    result = train(MLP(), data, ddpm.simple_loss(schedule), config)
    return steps / result.seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    schedule = dmlib.get_schedule("cosine")
    data = eight_gaussians().sample(50_000, torch.Generator().manual_seed(0))
    runs = {
        "dmlib": lambda: dmlib_loop(data, args.steps, args.batch, schedule),
        "bare+same": lambda: bare_loop(data, args.steps, args.batch, schedule, same_work=True),
        "bare": lambda: bare_loop(data, args.steps, args.batch, schedule, same_work=False),
    }
    bare_loop(data, 50, args.batch, schedule, True)  # warm-up: first-call costs out of the timing
    best = {name: 0.0 for name in runs}
    for r in range(args.rounds):
        for name, run in runs.items():
            best[name] = max(best[name], run())
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.0f} steps/s" for k, v in best.items()), flush=True)
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.steps} steps per run"
    )
    for name, v in best.items():
        print(f"{name:>10}: {v:7.1f} steps/s")
    print(f"ratio dmlib / bare+same = {best['dmlib'] / best['bare+same']:.3f}  (target >= 0.9)")
    print(
        f"ratio dmlib / bare      = {best['dmlib'] / best['bare']:.3f}  (the price of clipping and EMA included)"
    )


if __name__ == "__main__":
    main()
