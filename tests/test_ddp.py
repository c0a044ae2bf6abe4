"""Data-parallel training on the CPU with the gloo backend and two processes launched by torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmlib.train import load_checkpoint

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _ddp_worker  # noqa: E402

ENV = os.environ | {"OMP_NUM_THREADS": "1", "DMLIB_PROFILE": "test"}


def torchrun(*args, nproc=2, **kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.Popen(cmd, env=ENV, cwd=HERE.parent, start_new_session=True, **kwargs)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out


@pytest.mark.slow
def test_two_ranks_with_half_batches_equal_one_process_with_the_whole(tmp_path):
    """DDP averages the gradients of two half batches: the same step as one full batch, to float tolerance.
    Catches: gradients summed instead of averaged, ranks not seeing disjoint halves of each batch,
    ranks starting from different weights (the worker seeds them differently; DDP must broadcast)."""
    out = tmp_path / "two.safetensors"
    finish(
        torchrun(
            str(HERE / "_ddp_worker.py"),
            str(out),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )
    two = load_file(str(out))
    threads = torch.get_num_threads()
    try:
        one = _ddp_worker.job()
    finally:
        torch.set_num_threads(threads)
    for name, value in one.model.state_dict().items():
        torch.testing.assert_close(
            two[f"model.{name}"], value, rtol=1e-5, atol=1e-6, msg=f"differs in {name}"
        )
    for name, value in one.ema.state_dict().items():
        torch.testing.assert_close(two[f"ema.{name}"], value, rtol=1e-5, atol=1e-6)
    # the logged loss is rank 0's half batch: close to, not equal to, the full batch's
    assert not torch.equal(two["losses"], one.losses)


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1's loss is NaN at the last step of a check window, rank 0's is finite: both must stop there.
    Catches: a rank that saw no NaN going on alone (it would wait forever in the next all-reduce, or
    finish with weights that rank 1 no longer shares)."""
    proc = torchrun(
        str(HERE / "_ddp_worker.py"),
        str(tmp_path / "w.safetensors"),
        "7",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "loss became nan at step 7" in out
    assert "another rank's loss became non-finite before step 8" in out
    assert not (tmp_path / "w.safetensors").exists()


def _config(tmp_path, name, steps=24):
    cfg = {
        "dataset": "digits",
        "out": str(tmp_path / name),
        "limit": 256,
        "net": {
            "kind": "adm",
            "base": 16,
            "channel_mults": [1, 2],
            "num_res_blocks": 1,
            "attention_resolutions": [4],
            "groups": 8,
        },
        "class_conditional": True,
        "sample_every": 12,
        "sample_steps": 4,
        "train": {
            "steps": steps,
            "batch_size": 16,
            "lr": 1e-3,
            "checkpoint_every": 4,
            "check_every": 4,
            "progress": False,
        },
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _weights(run_dir):
    tensors, meta = load_checkpoint(run_dir / "checkpoint.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema."))}, meta


@pytest.mark.slow
def test_killed_two_rank_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL both ranks (and torchrun) after a checkpoint; the same command resumes to the weights of an
    uninterrupted run, bit for bit. Then a one-process run continues the two-rank checkpoint."""
    args = ["-m", "dmlib.train_images", "--config"]
    finish(
        torchrun(
            *args,
            str(_config(tmp_path, "straight")),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )

    killed_cfg = _config(tmp_path, "killed")
    ckpt = tmp_path / "killed" / "checkpoint.safetensors"
    proc = torchrun(*args, str(killed_cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(load_checkpoint(ckpt)[1]["step"])
    assert 0 < killed_at < 24, "the run was not killed mid-way: the test proved nothing"
    finish(torchrun(*args, str(killed_cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    straight, meta = _weights(tmp_path / "straight")
    resumed, _ = _weights(tmp_path / "killed")
    assert meta["world_size"] == "2" and meta["step"] == "24"
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=f"differs in {name}")
    assert (tmp_path / "killed" / "ema.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "straight").glob("samples_*.png")) == [
        "samples_0000012.png",
        "samples_0000024.png",
    ]
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == [4, 8, 12, 16, 20, 24]

    # another world size: one process continues the two-rank run (its random streams restart)
    extend = subprocess.run(
        [sys.executable, "-m", "dmlib.train_images", "--config", str(killed_cfg), "--steps", "32"],
        env=ENV,
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert extend.returncode == 0, extend.stderr
    _, meta = _weights(tmp_path / "killed")
    assert meta["world_size"] == "1" and meta["step"] == "32"


@pytest.mark.parametrize("name", ["digits8_adm", "fmnist32_adm", "fmnist32_dit"])
def test_shipped_configs_build_their_networks(name):
    """Every config in dmlib/configs loads (no unknown key) and builds its network, on the meta device."""
    from dmlib import train_images
    from dmlib.nets.flops import count_parameters

    cfg = train_images.load_config(name)
    side = cfg["pad_to"] or 8
    with torch.device("meta"):
        net = train_images.build_net(cfg, torch.zeros(1, side, side), 10)
    assert count_parameters(net) > 1e6
    assert train_images.CONFIGS.joinpath(f"{name}.json").exists()


def test_config_errors_are_clear(tmp_path):
    from dmlib import train_images

    with pytest.raises(FileNotFoundError, match="name a shipped config: digits8_adm, fmnist32_adm"):
        train_images.load_config("fmnist_typo")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dataset": "digits", "out": "x", "lerning_rate": 1}))
    with pytest.raises(ValueError, match="unknown keys in .*: lerning_rate"):
        train_images.load_config(bad)
