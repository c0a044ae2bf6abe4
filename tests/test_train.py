import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmlib import ddpm, get_schedule, metrics
from dmlib.data import eight_gaussians, make_toy
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
        ddpm.simple_loss(sched),
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


# ---- the trainer's settings: data sources, resume rules, precision, warm-up, accumulation, EMA, log ----


def _regression_data(n=64):
    """(x, target) pairs: a loss with no randomness, so runs can be compared to the last bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    return x, torch.tanh(x @ torch.tensor([[1.0, -2.0], [0.5, 1.0]]))


def _regression_loss(model, batch, g):
    x, y = batch
    return ((model(x, torch.zeros(x.shape[0], device=x.device)) - y) ** 2).mean()


def _loader(batch_size=8, shuffle=True):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(
        TensorDataset(*_regression_data()),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(5),
    )


def _net():
    torch.manual_seed(0)
    return MLP(hidden=16, depth=2)


def _same_weights(a, b, atol=0.0):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(
            x, y, rtol=0 if atol == 0 else 1e-5, atol=atol, msg=f"weights differ in {name}"
        )


def test_dataloader_run_resumed_mid_epoch_equals_straight_run(tmp_path):
    """A DataLoader is re-seeded per epoch and skipped to the saved batch: resume lands on the same batches.
    Catches: a resumed run starting the epoch over, or an epoch order drawn from unseeded randomness."""
    ckpt = tmp_path / "c.safetensors"
    cfg = dict(lr=1e-2, progress=False, device="cpu", checkpoint_every=11)  # 8 batches per epoch
    straight = train(_net(), _loader(), _regression_loss, TrainConfig(steps=30, **cfg))
    train(_net(), _loader(), _regression_loss, TrainConfig(steps=11, checkpoint=str(ckpt), **cfg))
    resumed = train(_net(), _loader(), _regression_loss, TrainConfig(steps=30, checkpoint=str(ckpt), **cfg))
    _same_weights(resumed.model, straight.model)
    _same_weights(resumed.ema, straight.ema)
    # and the data order really depends on the epoch: one epoch is not the next one again
    other = train(_net(), _loader(shuffle=False), _regression_loss, TrainConfig(steps=30, **cfg))
    assert not torch.equal(other.losses, straight.losses)


def test_iterator_of_batches_and_exhaustion():
    batches = iter([_regression_data(8)] * 3)
    result = train(_net(), batches, _regression_loss, TrainConfig(steps=3, progress=False))
    assert result.losses.shape == (3,)
    with pytest.raises(ValueError, match="exhausted"):
        train(_net(), iter([_regression_data(8)] * 2), _regression_loss, TrainConfig(steps=3, progress=False))


def test_resume_with_other_settings_names_the_differences(tmp_path):
    ckpt = tmp_path / "c.safetensors"
    train(_net(), _loader(), _regression_loss, TrainConfig(steps=2, checkpoint=str(ckpt), progress=False))
    with pytest.raises(ValueError, match=r"(?s)lr: checkpoint 0.001, now 0.01.*seed: checkpoint 0, now 1"):
        train(
            _net(),
            _loader(),
            _regression_loss,
            TrainConfig(steps=4, lr=1e-2, seed=1, checkpoint=str(ckpt), progress=False),
        )
    # steps, intervals and the progress bar may change
    train(
        _net(),
        _loader(),
        _regression_loss,
        TrainConfig(steps=4, check_every=1, checkpoint=str(ckpt), progress=False),
    )


def test_resume_with_another_model_configuration_is_refused(tmp_path):
    class Configured(MLP):
        def __init__(self, hidden):
            super().__init__(hidden=hidden)
            self.config = {"hidden": hidden, "dim": 2}

    ckpt = tmp_path / "c.safetensors"
    train(
        Configured(8), _loader(), _regression_loss, TrainConfig(steps=2, checkpoint=str(ckpt), progress=False)
    )
    with pytest.raises(ValueError, match="hidden: checkpoint 8, now 16"):
        train(
            Configured(16),
            _loader(),
            _regression_loss,
            TrainConfig(steps=4, checkpoint=str(ckpt), progress=False),
        )
    _, meta = load_checkpoint(ckpt)
    assert json.loads(meta["model_config"]) == {"hidden": 8, "dim": 2}


def _rewrite_meta(path, **changes):
    from safetensors.torch import save_file

    tensors, meta = load_checkpoint(path)
    save_file(tensors, str(path), metadata=meta | changes)


def test_checkpoint_from_another_device_resumes_with_a_fresh_stream(tmp_path):
    """A CUDA generator's state cannot continue on the CPU: the stream restarts from (seed, rank, step),
    reproducibly. Catches: set_state of a foreign state (an error), or an unseeded restart."""
    data = make_toy("two_moons", 256, torch.Generator().manual_seed(0))
    sched = get_schedule("cosine")
    loss = ddpm.simple_loss(sched)
    ckpt = tmp_path / "c.safetensors"
    cfg = dict(batch_size=16, progress=False, device="cpu")
    train(_net(), data, loss, TrainConfig(steps=5, checkpoint=str(ckpt), **cfg))
    straight = train(_net(), data, loss, TrainConfig(steps=10, checkpoint=str(ckpt), **cfg))
    # pretend the checkpoint was written on CUDA (its rng entry is then a Philox state)
    (tmp_path / "d.safetensors").write_bytes(ckpt.read_bytes())
    train(_net(), data, loss, TrainConfig(steps=5, checkpoint=str(tmp_path / "e.safetensors"), **cfg))
    runs = []
    for name in ("e1", "e2"):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes((tmp_path / "e.safetensors").read_bytes())
        _rewrite_meta(path, rng_device="cuda")
        runs.append(train(_net(), data, loss, TrainConfig(steps=10, checkpoint=str(path), **cfg)))
    _same_weights(runs[0].model, runs[1].model)
    assert not torch.equal(runs[0].losses, straight.losses)  # a new stream, not the saved one


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains(precision):
    """bf16 autocast and fp16 with a gradient scaler train as fp32 does (on the CPU, as they would on CUDA),
    and do run in reduced precision (their losses are not fp32's to the bit); master weights stay fp32."""
    cfg = dict(steps=100, lr=1e-2, progress=False)
    low = train(_net(), _loader(), _regression_loss, TrainConfig(precision=precision, **cfg))
    full = train(_net(), _loader(), _regression_loss, TrainConfig(**cfg))
    assert full.losses[-10:].mean() < 0.5 * full.losses[:5].mean()
    assert abs(low.losses[-10:].mean() - full.losses[-10:].mean()) < 0.1 * full.losses[-10:].mean()
    assert not torch.equal(low.losses, full.losses)
    assert all(p.dtype == torch.float32 for p in low.model.parameters())


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        TrainConfig(steps=1, precision="half")
    with pytest.raises(ValueError, match="accumulation"):
        TrainConfig(steps=1, accumulation=0)
    with pytest.raises(TypeError, match="steps counts steps or examples: a whole number; got 2.5"):
        TrainConfig(steps=2.5)
    with pytest.raises(ValueError, match="grad_clip must be a positive norm"):
        TrainConfig(steps=1, grad_clip=0.0)
    with pytest.raises(ValueError, match=r"data has no examples \(shape \(0, 2\)\)"):
        train(_net(), torch.empty(0, 2), _regression_loss, TrainConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="data yielded no batches"):
        train(_net(), iter([]), _regression_loss, TrainConfig(steps=1, progress=False))


def test_warmup_logs_and_callback(tmp_path):
    log = tmp_path / "log.jsonl"
    seen = []
    train(
        _net(),
        _loader(),
        _regression_loss,
        TrainConfig(steps=8, lr=0.1, warmup_steps=4, check_every=1, log=str(log), progress=False),
        callback=lambda step, model, ema: seen.append((step, model.training, ema.training)),
        callback_every=3,
    )
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["step"] for e in entries] == list(range(1, 9))
    assert [e["lr"] for e in entries] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert set(entries[0]) == {"step", "loss", "lr", "grad_norm", "steps_per_s", "samples_per_s"}
    assert all(e["grad_norm"] > 0 and e["samples_per_s"] > 0 for e in entries)
    assert seen == [(3, False, False), (6, False, False)]


def test_log_resumes_without_duplicate_steps(tmp_path):
    log, ckpt = tmp_path / "log.jsonl", tmp_path / "c.safetensors"
    cfg = dict(check_every=2, log=str(log), checkpoint=str(ckpt), checkpoint_every=4, progress=False)
    train(_net(), _loader(), _regression_loss, TrainConfig(steps=6, **cfg))
    ckpt.unlink()
    train(
        _net(), _loader(), _regression_loss, TrainConfig(steps=4, **cfg)
    )  # a run that logged to 6, saved at 4
    log.write_text(log.read_text() + json.dumps({"step": 6, "loss": 0}) + "\n")
    train(_net(), _loader(), _regression_loss, TrainConfig(steps=8, **cfg))
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [2, 4, 6, 8]


def test_gradient_accumulation_equals_the_larger_batch():
    """accumulation=2 of 4 examples takes the same step as one batch of 8 (the loss is their mean).
    Catches: losses summed instead of averaged over micro-batches, or gradients zeroed between them."""
    cfg = dict(lr=1e-2, progress=False, grad_clip=None)
    two = train(
        _net(), _loader(4, shuffle=False), _regression_loss, TrainConfig(steps=6, accumulation=2, **cfg)
    )
    one = train(_net(), _loader(8, shuffle=False), _regression_loss, TrainConfig(steps=6, **cfg))
    _same_weights(two.model, one.model, atol=1e-6)
    torch.testing.assert_close(two.losses, one.losses)


def test_ema_covers_buffers():
    class WithNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lin = torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 2)

        def forward(self, x, t):
            return self.lin(self.norm(x))

    torch.manual_seed(0)
    result = train(
        WithNorm(), _loader(), _regression_loss, TrainConfig(steps=20, ema_decay=0.5, progress=False)
    )
    ema_mean, live_mean = result.ema.norm.running_mean, result.model.norm.running_mean
    assert ema_mean.abs().sum() > 0, "the EMA's normalization statistics were never updated"
    assert not torch.equal(ema_mean, live_mean)  # averaged, not copied
    assert result.ema.norm.num_batches_tracked == result.model.norm.num_batches_tracked == 20


@pytest.mark.slow
def test_compiled_training_matches_eager_and_ema_is_not_compiled():
    """torch.compile changes nothing the reader sees: same losses (float tolerance), a plain module back."""
    cfg = dict(lr=1e-2, progress=False, device="cpu")
    eager = train(_net(), _loader(shuffle=False), _regression_loss, TrainConfig(steps=5, **cfg))
    compiled = train(
        _net(), _loader(shuffle=False), _regression_loss, TrainConfig(steps=5, compile=True, **cfg)
    )
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-4, atol=1e-5)
    _same_weights(compiled.ema, eager.ema, atol=1e-4)
    assert type(compiled.model) is MLP and type(compiled.ema) is MLP
