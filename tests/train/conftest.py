"""Shared by the stage tests: the session's tiny latent set under a fresh config per module, and the
metrics a run leaves behind."""

import csv
import io

import pytest

from histodiff_ray.config import load_config
from histodiff_ray.storage import read_bytes


@pytest.fixture(scope="module")
def latents(tiny_latents):
    """A fresh config per module (the drill changes step counts) over the session's tiny latent set."""
    overrides, bucket = tiny_latents
    return load_config("cpu", overrides), bucket


def csv_rows(run):

    text = read_bytes(run.join("metrics.csv")).decode()
    return [
        {k: float(v) if v else None for k, v in row.items()} | {"step": int(row["step"])}
        for row in csv.DictReader(io.StringIO(text))
    ]
