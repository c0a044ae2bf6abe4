"""One trainer for every scale: AdamW, EMA, gradient clipping, progress, atomic resumable checkpoints.

``train(model, data, loss_fn, config)`` draws minibatches from an in-memory tensor with one seeded
generator, so a run is a pure function of (model init, data, config): a run killed at any point and
resumed from its checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm  # text bars: they print in a terminal, in JupyterLab and in a book build

from .profiles import default_device

FORMAT = "dmlib-train-v1"


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint: str | None = None  # path of a .safetensors file; resumed from if it exists
    checkpoint_every: int = 1000
    check_every: int = 100  # how often losses are checked for NaN and the progress bar is updated
    device: str | None = None  # None: CUDA if available, else CPU
    progress: bool = True

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.check_every < 1 or self.checkpoint_every < 1:
            raise ValueError(
                f"steps >= 0, batch_size, check_every and checkpoint_every >= 1 needed; got {self}."
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1); got {self.ema_decay}.")


@dataclass
class TrainResult:
    model: torch.nn.Module
    # exponential moving average of the weights (Polyak & Juditsky 1992): sample with this
    ema: torch.nn.Module
    losses: torch.Tensor  # one loss per step, on the CPU
    seconds: float  # wall time of this call (not of earlier, resumed-from runs)


def _save_checkpoint(path: Path, model, ema, opt, generator, losses, step, config):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, state in opt_state["state"].items():
        tensors |= {f"optim.{idx}.{k}": torch.as_tensor(v) for k, v in state.items()}
    tensors["rng"] = generator.get_state()
    tensors["losses"] = losses
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "step": str(step),
        "param_groups": json.dumps(opt_state["param_groups"]),
        "config": json.dumps(asdict(config)),
    }
    # write beside the target, then rename: a crash leaves the old checkpoint or the new, never half of one
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
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
    meta = {"format": "dmlib-weights-v1", "step": meta["step"], "config": meta["config"]} | provenance
    save_file(weights, str(out), metadata=meta)
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


def _restore(path: Path, model, ema, opt, generator):
    tensors, meta = load_checkpoint(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    generator.set_state(tensors["rng"])
    return int(meta["step"]), tensors["losses"]


def train(
    model: torch.nn.Module,
    data: torch.Tensor,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Generator], torch.Tensor],
    config: TrainConfig,
) -> TrainResult:
    """Minimize ``loss_fn(model, batch, generator)`` over minibatches of ``data`` (rows are examples).

    If ``config.checkpoint`` names an existing file, training resumes from it. On CUDA the forward
    pass runs under bf16 autocast. A non-finite loss stops training with the step it appeared at.
    """
    device = torch.device(config.device) if config.device else default_device()
    model = model.to(device)
    data = data.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    ckpt = Path(config.checkpoint) if config.checkpoint else None
    start, losses = 0, torch.empty(0)
    if ckpt is not None and ckpt.exists():
        start, losses = _restore(ckpt, model, ema, opt, generator)
        if start > config.steps:
            raise ValueError(f"checkpoint {ckpt} is at step {start}, beyond config.steps={config.steps}.")
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    buffer = torch.empty(config.steps, device=device)  # losses stay on device: no sync per step
    buffer[:start] = losses[:start].to(device)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    tic = time.perf_counter()
    bar = tqdm(
        total=config.steps, initial=start, disable=not config.progress, desc="training", mininterval=1.0
    )

    def check(upto: int):
        window = buffer[checked:upto]
        if not torch.isfinite(window).all():
            bad = checked + int((~torch.isfinite(window)).nonzero()[0])
            raise FloatingPointError(
                f"loss became {buffer[bad].item()} at step {bad}: lower lr (now {config.lr}) or check the data"
                + (f"; the last good checkpoint is {ckpt}." if ckpt is not None and ckpt.exists() else ".")
            )
        bar.set_postfix(loss=f"{window.mean().item():.4f}")
        bar.update(upto - checked)

    checked = start
    model.train()
    try:
        for step in range(start, config.steps):
            idx = torch.randint(0, data.shape[0], (config.batch_size,), device=device, generator=generator)
            with autocast:
                loss = loss_fn(model, data[idx], generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            # EMA with warm-up: early averages would otherwise be dominated by the random initialization
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - decay)
            buffer[step] = loss.detach()
            done = step + 1
            save = ckpt is not None and (done % config.checkpoint_every == 0 or done == config.steps)
            if save or done % config.check_every == 0 or done == config.steps:
                check(done)  # before saving: a checkpoint never holds weights trained on a NaN loss
                checked = done
            if save:
                _save_checkpoint(ckpt, model, ema, opt, generator, buffer[:done], done, config)
    finally:
        bar.close()  # also when a NaN stops training
    model.eval()
    ema.eval()
    return TrainResult(model, ema, buffer.cpu(), time.perf_counter() - tic)
