"""Run by test_ddp.py under torchrun (and in-process for one rank): a training job with no randomness,
so that W ranks with batch B/W can be compared with one process with batch B to float tolerance."""

import sys

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from dmlib import get_schedule
from dmlib.nets import MLP
from dmlib.train import TrainConfig, _rank_world, train

BATCH, STEPS = 16, 12


def dataset():
    """(x0, eps, t) triples: the noise and time of every example are fixed in the data, not drawn."""
    g = torch.Generator().manual_seed(0)
    n = 64
    return TensorDataset(
        torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g), torch.rand(n, generator=g)
    )


def loss_fn(model, batch, generator):
    sched = get_schedule("cosine")
    x0, eps, t = batch
    x_t = sched.alpha(t)[:, None] * x0 + sched.sigma(t)[:, None] * eps
    return ((model(x_t, t) - eps) ** 2).mean()


def job(nan_on_rank1_at=None):
    """Train; with ``nan_on_rank1_at=k``, rank 1's loss is NaN at step k (its k-th call) and nobody else's."""
    torch.set_num_threads(1)
    rank, world = _rank_world()
    calls = iter(range(10**6))

    def loss(model, batch, generator):
        value = loss_fn(model, batch, generator)
        return value * float("nan") if next(calls) == nan_on_rank1_at and rank == 1 else value

    data = dataset()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, seed=3, drop_last=True)
    loader = DataLoader(data, batch_size=BATCH // world, sampler=sampler)
    torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    if rank == 0:
        torch.manual_seed(0)
    net = MLP(hidden=32, depth=2)
    config = TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-2, check_every=4, progress=False, device="cpu")
    return train(net, loader, loss, config)


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    result = job(int(sys.argv[2]) if len(sys.argv) > 2 else None)
    if torch.distributed.get_rank() == 0:
        tensors = {f"model.{k}": v for k, v in result.model.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in result.ema.state_dict().items()}
        save_file(tensors | {"losses": result.losses}, sys.argv[1])
    torch.distributed.destroy_process_group()
