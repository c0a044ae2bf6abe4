"""One trainer for every scale: a 2D toy on a laptop, images on a GPU, or many GPUs under ``torchrun``.

``train(model, data, loss_fn, config)`` minimizes ``loss_fn(model, batch, generator)`` with AdamW,
an exponential moving average (EMA) of the weights, gradient clipping, optional learning-rate
warm-up and gradient accumulation, a precision setting (fp32, bf16 autocast, fp16 with a gradient
scaler), optional ``torch.compile``, a progress bar, a JSONL log and atomic, resumable checkpoints.

``data`` is an in-memory tensor (minibatches drawn with one seeded generator), a ``DataLoader``
(epochs re-seeded so that epoch ``e``'s order is a function of its seed and ``e``), or any iterator
of batches. A run is a pure function of (model init, data, config): killed at any point and resumed
from its checkpoint, it ends with the same weights as an uninterrupted one (exactly for tensors and
DataLoaders with a seeded generator or a ``DistributedSampler``).

Under ``torch.distributed`` (launched by ``torchrun``; see :mod:`dmlib.train_images`) the model is
wrapped in ``DistributedDataParallel``, each rank draws its own noise, and only rank 0 writes
checkpoints, logs and the progress bar. A checkpoint resumes with another world size or on another
device; the random streams then restart from ``(seed, rank, step)`` (CPU and CUDA generators are
different algorithms, so one's state cannot continue on the other).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import numbers
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm  # text bars: they print in a terminal, in JupyterLab and in a book build

from .profiles import default_device

FORMAT = "dmlib-train-v1"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that change what a resumed run computes; a checkpoint refuses to resume if any differs.
# (steps may grow; paths, intervals, device and compile do not change the result.)
RESUME_KEYS = (
    "batch_size",
    "lr",
    "weight_decay",
    "ema_decay",
    "grad_clip",
    "seed",
    "warmup_steps",
    "accumulation",
    "precision",
)


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 256  # per process and micro-batch, for tensor data (a DataLoader sets its own)
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    seed: int = 0
    warmup_steps: int = 0  # learning rate rises linearly from lr / warmup_steps to lr
    accumulation: int = 1  # micro-batches per optimizer step (the loss is their mean)
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "fp16" (autocast and a gradient scaler)
    compile: bool = False  # torch.compile the forward pass (the EMA copy is made before, and not compiled)
    checkpoint: str | None = None  # path of a .safetensors file; resumed from if it exists
    checkpoint_every: int = 1000
    check_every: int = 100  # how often losses are checked for NaN, logged and shown on the progress bar
    log: str | None = None  # path of a JSONL log: one line per check_every steps
    device: str | None = None  # None: CUDA if available, else CPU
    progress: bool = True

    def __post_init__(self):
        counts = ("steps", "warmup_steps", "batch_size", "check_every", "checkpoint_every", "accumulation")
        for name in counts:
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"{name} counts steps or examples: a whole number; got {value!r}.")
            setattr(self, name, int(value))  # numpy integers too; the config is saved as JSON
        positive = ("batch_size", "check_every", "checkpoint_every", "accumulation")
        if self.steps < 0 or self.warmup_steps < 0 or any(getattr(self, k) < 1 for k in positive):
            raise ValueError(f"steps, warmup_steps >= 0 and {', '.join(positive)} >= 1 needed; got {self}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(
                f"grad_clip must be a positive norm, or None for no clipping; got {self.grad_clip}."
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1); got {self.ema_decay}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}.")


@dataclass
class TrainResult:
    model: torch.nn.Module  # on the training device, not compiled, not wrapped
    # exponential moving average of the weights (the decay-0.9999 average of Ho et al. 2020; Polyak &
    # Juditsky 1992 average the iterates uniformly): sample with this
    ema: torch.nn.Module
    losses: torch.Tensor  # one loss per step (this rank's), on the CPU
    seconds: float  # wall time of this call (not of earlier, resumed-from runs)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _generator(device: torch.device, seed: int) -> torch.Generator:
    # the meta device (the tests' strict device check) has no generator; a CPU one feeds its draws
    return torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(seed)


def _stream_seed(seed: int, rank: int, step: int) -> int:
    """The seed a rank's generator restarts from at ``step`` when its saved state cannot be used."""
    return (seed * 1_000_003 + rank * 7919 + step) % 2**63


def _config_diff(saved: dict, current: dict, keys) -> list[str]:
    return [
        f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


def _save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict[str, str]):
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    # write beside the target, then rename: a crash leaves the old checkpoint or the new, never half of one
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT} | meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a trainer checkpoint: ``(tensors, metadata)``, with a clear error if it is not one."""
    path = Path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"checkpoint {path} is unreadable ({err}); it is corrupt or not a safetensors file. "
            f"Delete it to train from scratch."
        ) from err
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not a dmlib trainer checkpoint (format {meta.get('format')!r})."
        )
    return tensors, meta


def export_weights(checkpoint, out, **provenance: str) -> Path:
    """Write the EMA weights of a trainer checkpoint to ``out`` (a small file to ship), with provenance."""
    tensors, meta = load_checkpoint(checkpoint)
    weights = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    out = Path(out)
    kept = {
        k: meta[k] for k in ("step", "config", "model_config") if k in meta
    }  # older checkpoints: no model_config
    save_file(weights, str(out), metadata={"format": "dmlib-weights-v1"} | kept | provenance)
    return out


def load_weights(model: torch.nn.Module, path) -> torch.nn.Module:
    """Load weights written by :func:`export_weights` into ``model``, with a clear error if they do not fit."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}.")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"weights file {path} is unreadable ({err}); it is corrupt or not safetensors."
        ) from err
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"weights in {path} do not fit {type(model).__name__}: {err}") from err
    return model


class _Batches:
    """Endless minibatches from a tensor, a DataLoader or an iterator, with a position that resumes.

    A tensor yields ``data[randint]`` drawn from the rank's generator. A DataLoader is iterated epoch
    by epoch; at each epoch start its sampler's ``set_epoch`` (``DistributedSampler``) is called and
    its generator, if it has one, is re-seeded with ``initial seed + epoch``, so the position
    ``(epoch, batches into it)`` identifies every later batch and a resumed run skips to it.
    """

    def __init__(self, data, device: torch.device, batch_size: int, generator: torch.Generator):
        self.data, self.device, self.batch_size, self.generator = data, device, batch_size, generator
        self.tensor = isinstance(data, torch.Tensor)
        if self.tensor and (data.ndim == 0 or data.shape[0] == 0):
            raise ValueError(f"data has no examples (shape {tuple(data.shape)}); rows are examples.")
        if self.tensor:
            self.data = data.to(device)
        loader_gen = getattr(data, "generator", None)
        self.base_seed = loader_gen.initial_seed() if isinstance(loader_gen, torch.Generator) else None
        self.epoch, self.index, self.iterator = 0, 0, None

    def _to_device(self, batch):
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        return batch

    def _start_epoch(self):
        if hasattr(getattr(self.data, "sampler", None), "set_epoch"):
            self.data.sampler.set_epoch(self.epoch)
        if self.base_seed is not None:
            self.data.generator.manual_seed(self.base_seed + self.epoch)
        self.iterator = iter(self.data)

    def seek(self, epoch: int, index: int, epoch_samples: int | None, world: int):
        """Continue at ``epoch`` where the run stopped: after ``epoch_samples`` examples of it (all ranks
        together), or after ``index`` batches if the data has no ``batch_size``."""
        if self.tensor or isinstance(self.data, Iterator):
            return  # a tensor keeps no position; a one-shot iterator cannot be rewound
        # with a DistributedSampler, global batch k is the same examples whatever the world size (each
        # rank takes every world-th of them), so the share of the epoch done converts to batches here
        batch = getattr(self.data, "batch_size", None)
        if epoch_samples is not None and batch:
            index = epoch_samples // (batch * world)
        self.epoch, self.index = epoch, 0
        self._start_epoch()
        for _ in itertools.islice(self.iterator, index):
            self.index += 1

    def epoch_samples(self, world: int) -> int | None:
        batch = getattr(self.data, "batch_size", None)
        return None if self.tensor or not batch else self.index * batch * world

    def next(self):
        if self.tensor:
            idx = torch.randint(
                0, self.data.shape[0], (self.batch_size,), device=self.device, generator=self.generator
            )
            return self.data[idx]
        if self.iterator is None:
            self._start_epoch()
        try:
            batch = next(self.iterator)
        except StopIteration:
            if self.index == 0:
                raise ValueError("data yielded no batches: an empty DataLoader or iterator.") from None
            self.epoch, self.index = self.epoch + 1, 0
            self._start_epoch()
            try:
                batch = next(self.iterator)
            except StopIteration:
                raise ValueError(
                    "the data iterator is exhausted: pass a DataLoader (re-iterable) or an endless iterator."
                ) from None
        self.index += 1
        return self._to_device(batch)


def _batch_size(batch) -> int:
    first = (
        batch
        if isinstance(batch, torch.Tensor)
        else next(iter(batch.values() if isinstance(batch, dict) else batch))
    )
    return first.shape[0]


class _EMA:
    """EMA of parameters and floating-point buffers (e.g. normalization statistics); other buffers copied.

    The tensor lists are gathered once: walking the module tree every step costs more than the
    update for a small network.
    """

    def __init__(self, ema: torch.nn.Module, model: torch.nn.Module):
        pairs = list(zip(ema.parameters(), model.parameters()))
        pairs += [(a, b) for a, b in zip(ema.buffers(), model.buffers()) if b.is_floating_point()]
        self.averaged, self.live = [a for a, _ in pairs], [b for _, b in pairs]
        self.copies = [(a, b) for a, b in zip(ema.buffers(), model.buffers()) if not b.is_floating_point()]

    @torch.no_grad()
    def update(self, weight: float):
        torch._foreach_lerp_(self.averaged, self.live, weight)
        for a, b in self.copies:
            a.copy_(b)


def train(
    model: torch.nn.Module,
    data: torch.Tensor | Iterable,
    loss_fn: Callable[[torch.nn.Module, object, torch.Generator], torch.Tensor],
    config: TrainConfig,
    *,
    callback: Callable[[int, torch.nn.Module, torch.nn.Module], None] | None = None,
    callback_every: int = 1000,
) -> TrainResult:
    """Minimize ``loss_fn(model, batch, generator)`` over minibatches of ``data``.

    ``data``: a tensor whose rows are examples, a ``DataLoader`` or any iterator of batches (a
    tensor, a tuple or a dict of tensors, moved to the training device). If ``config.checkpoint``
    names an existing file, training resumes from it; a checkpoint made with other settings
    (``RESUME_KEYS``) or another model configuration (``model.config``) is refused, naming the
    differences. A non-finite loss stops training with the step it appeared at.
    ``callback(step, model, ema)`` runs on rank 0 every ``callback_every`` steps (e.g. a sample grid).
    """
    device = torch.device(config.device) if config.device else default_device()
    rank, world = _rank_world()
    raw = forward = model.to(device)
    if world > 1:  # DDP broadcasts rank 0's weights to every rank when it wraps the model
        forward = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None
        )
    ddp = forward
    # the EMA copy is made before compiling and is never compiled: a compiled module would not see
    # the weights that _EMA.update writes into it
    ema = copy.deepcopy(raw).requires_grad_(False).eval()  # never trained: evaluated (dropout off)
    if config.compile:
        forward = torch.compile(forward)
    opt = torch.optim.AdamW(raw.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    autocast = (
        torch.autocast(device.type, dtype=PRECISIONS[config.precision])
        if config.precision != "fp32"
        else contextlib.nullcontext()  # no autocast at all: it is not defined on every device
    )
    # rank 0 draws exactly what a single process draws; other ranks get streams of their own
    generator = _generator(device, config.seed if rank == 0 else _stream_seed(config.seed, rank, 0))
    batches = _Batches(data, device, config.batch_size, generator)
    model_config = getattr(raw, "config", None)
    ckpt = Path(config.checkpoint) if config.checkpoint else None
    start, losses = 0, torch.empty(0)
    if ckpt is not None and ckpt.exists():
        start, losses = _restore(ckpt, raw, ema, opt, scaler, generator, batches, config, model_config)
    if ckpt is not None and rank == 0:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    log = Path(config.log) if config.log and rank == 0 else None
    if log is not None:
        _truncate_log(log, start)
    buffer = torch.empty(config.steps, device=device)  # losses stay on device: no sync per step
    buffer[:start] = losses[:start].to(device)
    grad_norms = torch.zeros(config.steps, device=device)
    params = list(raw.parameters())
    averager = _EMA(ema, raw)
    tic = last_time = time.perf_counter()
    samples = 0
    bar = tqdm(
        total=config.steps,
        initial=start,
        disable=not config.progress or rank != 0,
        desc="training",
        mininterval=1.0,
    )

    def check(upto: int):
        nonlocal last_time, samples
        window = buffer[checked:upto]
        bad_somewhere = (~torch.isfinite(window)).any()
        if world > 1:  # every rank stops together; one that went on alone would wait forever in DDP
            bad_somewhere = bad_somewhere.to(torch.uint8)
            dist.all_reduce(bad_somewhere, op=dist.ReduceOp.MAX)
        if bad_somewhere:
            nonfinite = (~torch.isfinite(window)).nonzero()
            if len(nonfinite) == 0:
                raise FloatingPointError(f"another rank's loss became non-finite before step {upto}.")
            bad = checked + int(nonfinite[0])
            raise FloatingPointError(
                f"loss became {buffer[bad].item()} at step {bad}: lower lr (now {config.lr}) or check the data"
                + (f"; the last good checkpoint is {ckpt}." if ckpt is not None and ckpt.exists() else ".")
            )
        mean = window.mean().item()
        bar.set_postfix(loss=f"{mean:.4f}")
        bar.update(upto - checked)
        now = time.perf_counter()
        if log is not None:
            entry = {
                "step": upto,
                "loss": mean,
                "lr": opt.param_groups[0]["lr"],
                "grad_norm": grad_norms[checked:upto].mean().item(),
                "steps_per_s": (upto - checked) / (now - last_time),
                "samples_per_s": samples * world / (now - last_time),
            }
            with open(log, "a") as f:
                f.write(json.dumps(entry) + "\n")
        last_time, samples = now, 0

    checked = start
    raw.train()
    try:
        for step in range(start, config.steps):
            for group in opt.param_groups:
                group["lr"] = (
                    config.lr * min(1.0, (step + 1) / config.warmup_steps)
                    if config.warmup_steps
                    else config.lr
                )
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(config.accumulation):
                batch = batches.next()
                samples += _batch_size(batch)
                # gradients are all-reduced once per optimizer step, on the last micro-batch
                sync = micro == config.accumulation - 1 or world == 1
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    with autocast:
                        loss = loss_fn(forward, batch, generator)
                    scaler.scale(loss / config.accumulation).backward()
                total = total + loss.detach().float() / config.accumulation
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(
                params, config.grad_clip if config.grad_clip is not None else math.inf
            )
            scaler.step(opt)
            scaler.update()
            # EMA with warm-up: early averages would otherwise be dominated by the random initialization
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            averager.update(1 - decay)
            buffer[step], grad_norms[step] = total, norm.detach()
            done = step + 1
            save = ckpt is not None and (done % config.checkpoint_every == 0 or done == config.steps)
            if save or done % config.check_every == 0 or done == config.steps:
                check(done)  # before saving: a checkpoint never holds weights trained on a NaN loss
                checked = done
            if save:
                state = _checkpoint_state(raw, ema, opt, generator, buffer[:done], world)
                if rank == 0:
                    meta = {
                        "step": str(done),
                        "epoch": str(batches.epoch),
                        "index": str(batches.index),
                        "epoch_samples": json.dumps(batches.epoch_samples(world)),
                        "world_size": str(world),
                        "rng_device": device.type,
                        "param_groups": json.dumps(opt.state_dict()["param_groups"]),
                        "scaler": json.dumps(scaler.state_dict()),
                        "config": json.dumps(asdict(config)),
                        "model_config": json.dumps(model_config),
                    }
                    _save_checkpoint(ckpt, state, meta)
            if callback is not None and rank == 0 and done % callback_every == 0:
                raw.eval()
                callback(done, raw, ema)
                raw.train()
    finally:
        bar.close()  # also when a NaN stops training
    raw.eval()
    ema.eval()
    return TrainResult(raw, ema, buffer.cpu(), time.perf_counter() - tic)


def _checkpoint_state(raw, ema, opt, generator, losses, world) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds; under DDP every rank's generator state is gathered to rank 0."""
    tensors = {f"model.{k}": v for k, v in raw.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    for idx, state in opt.state_dict()["state"].items():
        tensors |= {f"optim.{idx}.{k}": torch.as_tensor(v) for k, v in state.items()}
    rng = generator.get_state()
    states = [rng]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, rng)
    tensors |= {f"rng.{r}": s for r, s in enumerate(states)}
    tensors["losses"] = losses
    return tensors


def _restore(path: Path, raw, ema, opt, scaler, generator, batches, config, model_config):
    tensors, meta = load_checkpoint(path)
    saved = {f.name: f.default for f in fields(TrainConfig)} | json.loads(meta["config"])
    diff = _config_diff(saved, asdict(config), RESUME_KEYS)
    saved_model = json.loads(meta.get("model_config", "null"))
    if saved_model != model_config:
        keys = sorted(set(saved_model or {}) | set(model_config or {}))
        diff += _config_diff(saved_model or {}, model_config or {}, keys) or ["model: configuration differs"]
    if diff:
        raise ValueError(
            f"checkpoint {path} was made with other settings, so resuming would not continue that run:\n  "
            + "\n  ".join(diff)
            + "\nUse the checkpoint's settings, or another checkpoint path to start a new run."
        )
    step = int(meta["step"])
    if step > config.steps:
        raise ValueError(f"checkpoint {path} is at step {step}, beyond config.steps={config.steps}.")
    raw.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    if "scaler" in meta:
        scaler.load_state_dict(json.loads(meta["scaler"]))
    rank, world = _rank_world()
    rng = tensors.get(f"rng.{rank}", tensors.get("rng") if rank == 0 else None)
    same_stream = meta.get("rng_device", generator.device.type) == generator.device.type
    if rng is not None and same_stream and int(meta.get("world_size", 1)) == world:
        generator.set_state(rng)
    else:
        generator.manual_seed(_stream_seed(config.seed, rank, step))
    samples = json.loads(meta.get("epoch_samples", "null"))
    batches.seek(int(meta.get("epoch", 0)), int(meta.get("index", 0)), samples, world)
    return step, tensors["losses"]


def _truncate_log(log: Path, step: int):
    """Drop log lines past ``step`` (a killed run may have logged beyond its last checkpoint)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if not log.exists():
        return
    kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    log.write_text("".join(line + "\n" for line in kept))
