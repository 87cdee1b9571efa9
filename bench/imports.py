"""What each kind of Ray process pays to import its code, against the floor of the libraries it
cannot do without:

    .venv/bin/python bench/imports.py            # ~2 min; run it alone

Every Ray actor is a new process, and Ray Train starts several per training run (controller, one per
worker, Ray Data's coordinators and read tasks); on a 2-core machine their imports are most of a
short run's start. Each row imports one module in a fresh interpreter, ``--repeat`` times, and
prints the least CPU time (user + system, children's rusage: robust to other load, unlike wall
time) beside its floor's: what a process that streams latents, a Train worker of the UNet or the
guide, and one of the autoencoder must import at the least.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROWS = [  # (who imports it, module, floor: what that process needs in any case)
    ("latent stream (Ray Data tasks)", "histodiff_ray.data.latents", "ray.data"),
    ("tile stream (Ray Data tasks)", "histodiff_ray.data.tiles", "ray.data"),
    (
        "UNet Train worker",
        "histodiff_ray.train.diffusion",
        "ray.data, ray.train.torch, diffusers.models.unets.unet_2d",
    ),
    (
        "guide Train worker",
        "histodiff_ray.train.guide",
        "ray.data, ray.train.torch, diffusers.models.unets.unet_2d",
    ),
    (
        "autoencoder Train worker",
        "histodiff_ray.train.autoencoder",
        "ray.data, ray.train.torch, diffusers.models.autoencoders.autoencoder_kl, torchmetrics.functional.image",
    ),
]


def cpu_seconds(statement: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", statement], cwd=REPO, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best = min(best, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="imports per row; the least CPU time is kept")
    args = parser.parse_args()
    print("| process | module | CPU s | floor CPU s | module / floor |")
    print("|---|---|---|---|---|")
    for who, module, floor in ROWS:
        own, least = cpu_seconds(f"import {module}", args.repeat), cpu_seconds(f"import {floor}", args.repeat)
        print(f"| {who} | `{module}` | {own:.2f} | {least:.2f} | {own / least:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
