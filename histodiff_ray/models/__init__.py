"""The models, built from config (pure torch), and where they run."""

import numpy as np
import torch


def default_device() -> torch.device:
    """The GPU that Ray gave this task, actor or job (it sets CUDA_VISIBLE_DEVICES), else the CPU.
    Inference stages and tile classifiers use it; Ray Train loops ask ``ray.train.torch.get_device()``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_tensor(tiles: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 → float32 N×3×H×W in [-1, 1] (channels-last strides): every pixel model's input."""
    tiles = np.ascontiguousarray(tiles)
    if not tiles.flags.writeable:  # Ray's object store hands out read-only arrays, which torch warns about
        tiles = tiles.copy()
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1.0
