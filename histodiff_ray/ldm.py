"""A trained latent diffusion model, loaded from a run folder: sample latents, decode tiles.

ldm = LatentDiffusion.from_run(open_location("runs/finetune", cfg.storage))
tiles = ldm.decode(ldm.sample(16, steps=50, generator=torch.Generator().manual_seed(0)))
"""

from __future__ import annotations

import io
import math
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DModel
from PIL import Image
from tqdm import tqdm

from histodiff_ray.config import Config, DiffusionConfig
from histodiff_ray.diffusion.guidance import classifier_free_eps
from histodiff_ray.diffusion.sampler import ddim_sample, dpm_solver_sample
from histodiff_ray.diffusion.schedule import NoiseSchedule
from histodiff_ray.models import default_device
from histodiff_ray.models.unet import null_class
from histodiff_ray.storage import Location, download_dir, open_location, read_run_info, write_atomic


@dataclass
class LatentDiffusion:
    unet: torch.nn.Module
    vae: torch.nn.Module
    schedule: NoiseSchedule
    scale_factor: float
    latent_shape: tuple[int, int, int]
    device: torch.device
    prediction_type: str = "epsilon"

    @classmethod
    def from_run(cls, run: Location, device: str | None = None) -> LatentDiffusion:

        info = read_run_info(run)
        dev = torch.device(device) if device else default_device()
        with tempfile.TemporaryDirectory(prefix="ldm-") as tmp:  # S3 weights are copied here, read, and deleted
            local = download_dir(run.join("model"), tmp)
            # Channels-last: oneDNN's (CPU) and cuDNN's fast convolution path; 1.2-1.5x faster sampling here.
            unet = (
                UNet2DModel.from_pretrained(f"{local}/unet", use_safetensors=True)
                .to(dev, memory_format=torch.channels_last)
                .eval()
            )
            vae = (
                AutoencoderKL.from_pretrained(f"{local}/vae", use_safetensors=True)
                .to(dev, memory_format=torch.channels_last)
                .eval()
            )
        d = DiffusionConfig(**info["config"]["diffusion"])
        shape = tuple(info["latent_shape"])
        return cls(unet, vae, NoiseSchedule.from_config(d), float(info["scale_factor"]), shape, dev, d.prediction_type)

    @property
    def null_class(self) -> int | None:
        """The null class of a class-conditional (classifier-free) UNet; None when unconditional."""
        return null_class(self.unet)

    def eps(self, z: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if class_labels is None and self.null_class is not None:  # unconditional samples of a conditional UNet
            class_labels = torch.full((z.shape[0],), self.null_class, device=z.device, dtype=torch.long)
        return self.schedule.eps(self.unet(z, t, class_labels=class_labels).sample, z, t, self.prediction_type)

    def sample(
        self,
        n: int,
        *,
        steps: int = 50,
        eta: float = 1.0,
        generator: torch.Generator | None = None,
        cond_fn=None,
        guidance_scale: float = 0.0,
        labels: torch.Tensor | None = None,
        cfg_scale: float = 1.0,
        sampler: str = "ddim",
        karras_sigmas: bool = False,
        progress=None,
    ) -> torch.Tensor:
        """Scaled latents z_0 (n × C × h × w). ``labels`` with a class-conditional UNet samples those
        classes with classifier-free guidance at ``cfg_scale``; ``cond_fn`` adds classifier guidance.
        ``sampler``: "ddim" (with ``eta``), "dpmsolver++" (deterministic) or "sde-dpmsolver++", the last two
        optionally on Karras et al.'s noise levels (``karras_sigmas``)."""
        model = self.eps
        if labels is not None:
            if self.null_class is None:
                raise ValueError("this UNet has no class embedding; fine-tune it with guidance.kind=classifier_free")
            model = classifier_free_eps(self.eps, labels, self.null_class, cfg_scale)
        shared = {
            "steps": steps,
            "generator": generator,
            "device": self.device,
            "cond_fn": cond_fn,
            "guidance_scale": guidance_scale,
            "progress": progress,
        }
        if sampler == "ddim":
            return ddim_sample(model, self.schedule, (n, *self.latent_shape), eta=eta, **shared)
        if sampler in ("dpmsolver++", "sde-dpmsolver++"):
            stochastic = sampler == "sde-dpmsolver++"
            shape = (n, *self.latent_shape)
            return dpm_solver_sample(
                model, self.schedule, shape, stochastic=stochastic, karras_sigmas=karras_sigmas, **shared
            )
        raise ValueError(f"sampler {sampler!r} is not 'ddim', 'dpmsolver++' or 'sde-dpmsolver++'")

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Scaled latents → uint8 tiles, N × H × W × 3."""
        x = self.vae.decode(z / self.scale_factor).sample.clamp(-1, 1)
        return ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def sample_grid(
    cfg: Config, run: str, n: int, steps: int | None, eta: float | None, seed: int, output: str | None = None
) -> Location:
    """`histodiff sample`: ``n`` unconditional samples of a finished diffusion run as one PNG grid, at
    ``output`` or RUN/samples/<sampler><steps>[-eta<eta>]-seed<seed>.png; returns where it went."""
    run_loc = open_location(run, cfg.storage)
    ldm = LatentDiffusion.from_run(run_loc)
    steps = steps or cfg.sampling.ddim_steps
    eta = cfg.sampling.eta if eta is None else eta
    sampler = cfg.sampling.sampler
    z = ldm.sample(
        n,
        steps=steps,
        eta=eta,
        sampler=sampler,
        karras_sigmas=cfg.sampling.karras_sigmas,
        generator=torch.Generator().manual_seed(seed),
        progress=lambda ts: tqdm(ts, desc=sampler, unit="step"),
    )
    name = f"{sampler}{steps}-eta{eta:g}" if sampler == "ddim" else f"{sampler}{steps}"
    dest = open_location(output, cfg.storage) if output else run_loc.join("samples", f"{name}-seed{seed}.png")
    save_png(tile_grid(ldm.decode(z)), dest)
    return dest


def tile_grid(tiles: np.ndarray, columns: int | None = None, pad: int = 2) -> Image.Image:
    """N × H × W × 3 uint8 tiles → one white-padded grid image."""
    n, h, w, _ = tiles.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = tile
    return Image.fromarray(grid)


def save_png(image: Image.Image, dest: Location) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    write_atomic(dest, buf.getvalue())
