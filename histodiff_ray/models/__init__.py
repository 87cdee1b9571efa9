"""The models, built from config (pure torch), and where they run."""

import torch


def default_device() -> torch.device:
    """The GPU that Ray gave this task, actor or job (it sets CUDA_VISIBLE_DEVICES), else the CPU.
    Inference stages and tile classifiers use it; Ray Train loops ask ``ray.train.torch.get_device()``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
