"""Train an image diffusion model from a JSON config, on one device or many under ``torchrun``.

Usage::

    python -m dmlib.train_images --config fmnist32_adm                   # a config in dmlib/configs/
    python -m dmlib.train_images --config run.json                       # one CPU or GPU
    torchrun --standalone --nproc_per_node=8 -m dmlib.train_images --config run.json    # 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 -m dmlib.train_images --config run.json           # 2 nodes

Under ``torchrun`` each process trains on its share of every batch (a ``DistributedSampler``);
``DistributedDataParallel`` (NCCL on CUDA, gloo on the CPU) averages the gradients, so W ranks
with ``batch_size / W`` examples each take the step one process takes with ``batch_size``. Only
rank 0 writes the checkpoint, the JSONL log, sample grids and the exported EMA weights. Kill a run
and start the same command again (with any number of processes) to resume.

The config (every key but ``dataset`` and ``out`` optional)::

    {"dataset": "fashion_mnist",   # mnist | fashion_mnist | cifar10 | digits (8x8, ships with scikit-learn)
     "out": "runs/fmnist32",       # checkpoint.safetensors, log.jsonl, samples_<step>.png, ema.safetensors
     "pad_to": 32, "hflip": false, "limit": null, "download": false, "root": null,
     "net": {"kind": "adm", "base": 64, "channel_mults": [1, 2, 2], "attention_resolutions": [16]},
     "schedule": "cosine", "prediction": "eps",
     "class_conditional": false, "label_dropout": 0.1,   # labels dropped to the null class: for guidance
     "sample_every": 5000, "sample_steps": 50, "num_workers": 0,
     "train": {"steps": 100000, "batch_size": 128, "lr": 2e-4, "warmup_steps": 1000,
               "precision": "bf16", "compile": true, "checkpoint_every": 5000, "check_every": 100}}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, TensorDataset

from . import data as datasets
from .ddpm import simple_loss
from .nets import ADMUNet, DiT
from .parameterization import Denoiser
from .schedules import get_schedule
from .train import TrainConfig, export_weights, train

NETS = {"adm": ADMUNet, "dit": DiT}
DEFAULTS = {
    "pad_to": None,
    "hflip": False,
    "limit": None,
    "download": False,
    "root": None,
    "net": {"kind": "adm"},
    "schedule": "cosine",
    "prediction": "eps",
    "class_conditional": False,
    "label_dropout": 0.1,
    "sample_every": 5000,
    "sample_steps": 50,
    "num_workers": 0,
    "train": {},
}


CONFIGS = Path(__file__).resolve().parent / "configs"


def load_config(path) -> dict:
    """Read a run config, a JSON file or the name of one in ``dmlib/configs`` (e.g. ``fmnist32_adm``),
    filling defaults and refusing unknown keys (a typo would otherwise be silently ignored)."""
    shipped = CONFIGS / f"{path}.json"
    if not Path(path).exists() and shipped.exists():
        path = shipped
    if not Path(path).exists():
        names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
        raise FileNotFoundError(f"no config file {path}; write one, or name a shipped config: {names}.")
    cfg = json.loads(Path(path).read_text())
    unknown = set(cfg) - set(DEFAULTS) - {"dataset", "out"}
    if unknown:
        raise ValueError(
            f"unknown keys in {path}: {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}."
        )
    for key in ("dataset", "out"):
        if key not in cfg:
            raise ValueError(f"{path} must name {key!r}.")
    return DEFAULTS | cfg


def load_images(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images (uint8, or float in [-1, 1] for the 8x8 digits) and integer labels, on the CPU."""
    if cfg["dataset"] == "digits":
        x, y = datasets.load_digits(with_labels=True)
    else:
        x, y = datasets.load_image_dataset(
            cfg["dataset"], "train", root=cfg["root"], download=cfg["download"]
        )
    if cfg["limit"] is not None:
        x, y = x[: cfg["limit"]], y[: cfg["limit"]]
    return x, y


def build_net(cfg: dict, image: torch.Tensor, num_classes: int | None) -> torch.nn.Module:
    """The network named by ``cfg["net"]["kind"]``, sized for one (C, H, W) image after padding."""
    kwargs = dict(cfg["net"])
    kind = kwargs.pop("kind")
    if kind not in NETS:
        raise ValueError(f"net kind must be one of {', '.join(NETS)}; got {kind!r}.")
    size = cfg["pad_to"] or image.shape[-1]
    kwargs = {"in_channels": image.shape[0], "image_size": size, "num_classes": num_classes} | kwargs
    return NETS[kind](**kwargs)


def prepare(x: torch.Tensor, cfg: dict, generator: torch.Generator | None) -> torch.Tensor:
    """A batch as the network sees it: in [-1, 1], padded, optionally flipped, on the batch's device."""
    x = datasets.normalize_images(x) if x.dtype == torch.uint8 else x
    if cfg["pad_to"]:
        x = datasets.pad_images(x, cfg["pad_to"])
    return datasets.random_hflip(x, generator) if cfg["hflip"] else x


def make_loss(cfg: dict, num_classes: int | None):
    """``loss(model, batch, generator)``: L_simple (Ho et al. 2020, eq. 14) on prepared images; with
    labels, each is replaced by the null class with probability ``label_dropout`` (Ho & Salimans 2022)."""
    simple = simple_loss(get_schedule(cfg["schedule"]), prediction=cfg["prediction"])

    def loss(model, batch, generator):
        x, y = batch
        x = prepare(x, cfg, generator)
        if num_classes is None:
            return simple(model, x, generator)
        drop = torch.rand(y.shape, device=y.device, generator=generator) < cfg["label_dropout"]
        y = torch.where(drop, torch.full_like(y, num_classes), y)
        return simple(lambda x_t, t: model(x_t, t, y), x, generator)

    return loss


def sample_grid(ema, cfg: dict, shape, num_classes: int | None = None, seed: int = 0) -> torch.Tensor:
    """64 samples from the EMA network by DDIM (``sample_steps`` steps), for a progress picture: 8 rows
    of 8, row ``r`` of class ``r`` for a class-conditional network (unguided, conditional score)."""
    from .samplers import sample_ddim

    device = next(ema.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    x_T = torch.randn((64, *shape), generator=g, device=device)
    model = ema
    if num_classes is not None:
        y = torch.arange(64, device=device) // 8 % num_classes
        model = lambda x_t, t: ema(x_t, t, y)  # noqa: E731
    denoiser = Denoiser(model, get_schedule(cfg["schedule"]), cfg["prediction"], clip_x0=(-1, 1))
    with torch.no_grad():
        return sample_ddim(denoiser, x_T, torch.linspace(1, 0, cfg["sample_steps"] + 1))


def save_grid(images: torch.Tensor, path: Path, min_width: int = 512):
    """A PNG of the images in a grid, pixels repeated (nearest neighbour) to at least ``min_width`` wide."""
    import matplotlib.pyplot as plt
    import numpy as np

    from .plot import image_grid

    grid = image_grid(images)  # in [0, 1]
    scale = max(1, -(-min_width // grid.shape[1]))
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    plt.imsave(path, grid, cmap="gray", vmin=0, vmax=1)


def _setup_distributed() -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (a no-op without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world > 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        return dist.get_rank(), world, device
    return 0, 1, device


def _git_commit() -> str:
    """The commit of the dmlib that trained, for the weights' provenance ("unknown" outside a checkout)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
    except OSError:  # no git on this machine
        return "unknown"
    return rev.stdout.strip() if rev.returncode == 0 else "unknown"


def run(cfg: dict) -> Path:
    """Train as ``cfg`` says; returns the path of the exported EMA weights."""
    rank, world, device = _setup_distributed()
    try:
        out = Path(cfg["out"])
        out.mkdir(parents=True, exist_ok=True)
        tcfg = dict(cfg["train"])
        batch = tcfg.get("batch_size", TrainConfig.batch_size)
        if batch % world:
            raise ValueError(f"batch_size {batch} must be divisible by the number of processes ({world}).")
        config = TrainConfig(
            **tcfg,
            checkpoint=str(out / "checkpoint.safetensors"),
            log=str(out / "log.jsonl"),
            device=str(device),
        )
        x, y = load_images(cfg)
        num_classes = int(y.max()) + 1 if cfg["class_conditional"] else None
        dataset = TensorDataset(x, y)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=config.seed, drop_last=True)
        loader = datasets.image_loader(
            x,
            y,
            batch_size=batch // world,
            sampler=sampler,
            num_workers=cfg["num_workers"],
            seed=config.seed,
            pin_memory=device.type == "cuda",
        )
        # the same initial weights on every rank (DDP also broadcasts rank 0's)
        torch.manual_seed(config.seed)
        image = prepare(x[:1], cfg, None)[0]  # one image as the network sees it
        net, shape = build_net(cfg, image, num_classes), tuple(image.shape)

        def write_grid(step, model, ema):
            save_grid(sample_grid(ema, cfg, shape, num_classes), out / f"samples_{step:07d}.png")

        train(
            net,
            loader,
            make_loss(cfg, num_classes),
            config,
            callback=write_grid,
            callback_every=cfg["sample_every"],
        )
        weights = out / "ema.safetensors"
        if rank == 0:
            export_weights(
                config.checkpoint,
                weights,
                script="python -m dmlib.train_images",
                run_config=json.dumps(cfg),
                git_commit=_git_commit(),
                torch_version=torch.__version__,
                world_size=str(world),
            )
        return weights
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a JSON run config (see this module's docstring)")
    parser.add_argument("--steps", type=int, help="override train.steps (e.g. to extend a finished run)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.steps is not None:
        cfg["train"] = cfg["train"] | {"steps": args.steps}
    print(run(cfg))


if __name__ == "__main__":
    main()
