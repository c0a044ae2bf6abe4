"""Run by test_train.py in a subprocess that the test kills mid-run: a small deterministic training job."""

import sys

import torch

from dmlib import ddpm, get_schedule
from dmlib.data import make_toy
from dmlib.nets import MLP
from dmlib.train import TrainConfig, train


def job(checkpoint, steps):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = MLP(hidden=32, depth=2)
    x = make_toy("two_moons", 2048, torch.Generator().manual_seed(0))
    sched = get_schedule("cosine")
    config = TrainConfig(
        steps=steps,
        batch_size=64,
        seed=3,
        checkpoint=checkpoint,
        checkpoint_every=25,
        progress=False,
        device="cpu",
    )
    return train(net, x, ddpm.simple_loss(sched), config)


if __name__ == "__main__":
    job(sys.argv[1], int(sys.argv[2]))
