"""The models, built from config (pure torch), and where they run."""

import numpy as np
import torch


def default_device() -> torch.device:
    """The GPU that Ray gave this task, actor or job (it sets CUDA_VISIBLE_DEVICES), else the CPU.
    Inference stages and tile classifiers use it; Ray Train loops ask ``ray.train.torch.get_device()``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware on ``device``: a CUDA GPU that has them, or a CPU with
    AVX512-BF16 or AMX (oneDNN's check). Elsewhere autocast emulates bf16, far slower than fp32: one
    paper-profile UNet training step took 172 s in bf16 and 31 s in fp32 on one thread of an AVX2 CPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def to_tensor(tiles: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 → float32 N×3×H×W in [-1, 1] (channels-last strides): every pixel model's input."""
    tiles = np.ascontiguousarray(tiles)
    if not tiles.flags.writeable:  # Ray's object store hands out read-only arrays, which torch warns about
        tiles = tiles.copy()
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1.0
