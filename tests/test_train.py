import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmlib import ddpm, get_schedule, metrics
from dmlib.data import eight_gaussians
from dmlib.nets import MLP
from dmlib.train import TrainConfig, export_weights, load_checkpoint, load_weights, train

sys.path.insert(0, str(Path(__file__).parent))
from _train_worker import job  # noqa: E402

STEPS = 2000


def test_killed_run_resumes_to_identical_weights(tmp_path):
    """SIGKILL a training process after its first checkpoint, resume, and compare with an uninterrupted run."""
    ckpt = tmp_path / "run.safetensors"
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "_train_worker.py"), str(ckpt), str(STEPS)]
    )
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert proc.returncode != 0, "the worker finished before it was killed: the test proved nothing"
    _, meta = load_checkpoint(ckpt)
    killed_at = int(meta["step"])
    assert 0 < killed_at < STEPS

    threads = torch.get_num_threads()
    try:
        resumed = job(str(ckpt), STEPS)
        straight = job(None, STEPS)
    finally:
        torch.set_num_threads(threads)
    for (name, a), b in zip(resumed.model.state_dict().items(), straight.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"weights differ in {name}")
    for a, b in zip(resumed.ema.state_dict().values(), straight.ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(resumed.losses, straight.losses, rtol=0, atol=0)


def test_nan_loss_names_the_step():
    calls = {"n": 0}

    def loss_fn(model, batch, g):
        calls["n"] += 1
        loss = (model(batch, torch.zeros(batch.shape[0])) ** 2).mean()
        return loss * float("nan") if calls["n"] == 8 else loss

    with pytest.raises(FloatingPointError, match="loss became nan at step 7"):
        train(
            MLP(hidden=8, depth=1),
            torch.randn(64, 2),
            loss_fn,
            TrainConfig(steps=30, check_every=10, progress=False),
        )


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":'])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="bad.safetensors is unreadable"):
        train(
            MLP(),
            torch.randn(8, 2),
            lambda m, b, g: m(b, torch.zeros(len(b))).sum(),
            TrainConfig(steps=2, checkpoint=str(bad), progress=False),
        )


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "c.safetensors"
    train(
        MLP(hidden=8),
        torch.randn(8, 2),
        lambda m, b, g: (m(b, torch.zeros(len(b))) ** 2).mean(),
        TrainConfig(steps=3, checkpoint=str(ckpt), progress=False),
    )
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(ckpt)


def test_exported_weights_round_trip_and_mismatch(tmp_path):
    ckpt, out = tmp_path / "c.safetensors", tmp_path / "w.safetensors"
    result = train(
        MLP(hidden=8),
        torch.randn(8, 2),
        lambda m, b, g: (m(b, torch.zeros(len(b))) ** 2).mean(),
        TrainConfig(steps=3, checkpoint=str(ckpt), progress=False),
    )
    export_weights(ckpt, out, note="test")
    loaded = load_weights(MLP(hidden=8), out)
    for a, b in zip(loaded.state_dict().values(), result.ema.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="do not fit MLP"):
        load_weights(MLP(hidden=16), out)


@pytest.mark.slow
def test_ddpm_on_eight_gaussians_at_cpu_budget():
    """The quality bar Chapter 1 shows at the cpu profile: 8/8 modes, >= 90% of samples within 3 std of a mode."""
    torch.manual_seed(0)
    mix = eight_gaussians()
    sched = get_schedule("cosine")
    data = mix.sample(20_000, torch.Generator().manual_seed(0))
    result = train(
        MLP(),
        data,
        lambda m, b, g: ddpm.simple_loss(m, b, sched, generator=g),
        TrainConfig(steps=3000, batch_size=512, lr=2e-3, ema_decay=0.995, progress=False),
    )
    g = torch.Generator().manual_seed(1)
    from dmlib.parameterization import Denoiser

    x = ddpm.sample_ancestral(
        Denoiser(result.ema, sched), torch.randn(4000, 2, generator=g), torch.linspace(1, 0, 201), generator=g
    )
    cov = metrics.mode_coverage(x, mix)
    assert cov["modes"] == 8, cov
    assert cov["near"] >= 0.90, cov
    assert max(abs(w - 1 / 8) for w in cov["weights"]) < 0.04, cov
    assert math.isfinite(result.losses[-1].item())
