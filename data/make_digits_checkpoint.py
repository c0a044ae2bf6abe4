"""Train the 8x8-digits DDPM that Chapter 1 ships, with exactly the chapter's code.

    python data/make_digits_checkpoint.py            # about 20 minutes on one CPU core

It writes a resumable trainer checkpoint to data/cache/ (kill and rerun to resume) and then the
EMA weights with their provenance to data/ddpm_digits_unet16.safetensors. Record the new SHA-256
in data/registry.json.
"""

import json
import subprocess
from pathlib import Path

import torch

import dmlib
from dmlib import ddpm
from dmlib.data import load_digits, sha256
from dmlib.nets import UNet
from dmlib.train import TrainConfig, export_weights, train

HERE = Path(__file__).resolve().parent
SPEC = json.loads((HERE / "registry.json").read_text())["ddpm_digits_unet16"]


def main():
    torch.set_num_threads(1)
    schedule = dmlib.get_schedule(SPEC["schedule"])
    config = TrainConfig(
        **SPEC["train_config"], checkpoint=str(HERE / "cache" / "ddpm_digits_unet16.ckpt.safetensors")
    )
    net = UNet(**SPEC["unet"])
    train(net, load_digits(), ddpm.simple_loss(schedule), config)
    rev = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True, cwd=HERE
    )
    commit = rev.stdout.strip() if rev.returncode == 0 else ""
    out = export_weights(
        config.checkpoint,
        HERE / SPEC["file"],
        script="data/make_digits_checkpoint.py",
        git_commit=commit or "unknown",
        torch_version=torch.__version__,
        schedule=SPEC["schedule"],
        unet=json.dumps(SPEC["unet"]),
    )
    print(out, sha256(out))


if __name__ == "__main__":
    main()
