"""Ray Train runs for the autoencoder and the latent diffusion model, and what they leave behind.

A run is a folder RUN (local or ``s3://…``). While training it holds Ray Train's checkpoints; once
done it also holds::

    RUN/model/vae/          (autoencoder runs)  AutoencoderKL.from_pretrained(RUN/model/vae)
    RUN/model/unet/         (diffusion runs)    UNet2DModel.from_pretrained(RUN/model/unet), EMA weights
    RUN/model/scheduler/                        DDPMScheduler.from_pretrained(RUN/model/scheduler)
    RUN/model/vae/                              the autoencoder the latents came from
    RUN/run.json                                what it was trained on: data, scale factor, config
    RUN/metrics.csv, RUN/tensorboard/           the training curves (and RUN/curves.png to look at)

Launching again with the same RUN resumes from its latest checkpoint (Ray Train V2: the same
``RunConfig(storage_path, name)``); ``FailureConfig`` restarts failed workers from it too.
"""

from __future__ import annotations

import json
import os
import tempfile

from histodiff_ray.config import Config
from histodiff_ray.data.latents import load_latent_manifest, read_latents
from histodiff_ray.data.tiles import read_tiles
from histodiff_ray.errors import HistodiffError
from histodiff_ray.plots import curves_png
from histodiff_ray.raycluster import init_ray
from histodiff_ray.storage import Location, download_dir, open_location, read_bytes, read_run_info, upload_dir, write_atomic
from histodiff_ray.train.loops import autoencoder_loop, diffusion_loop


def fit(cfg: Config, loop, loop_config: dict, datasets: dict, run: Location):
    """Run ``loop`` on ``cfg.ray.num_workers`` Ray Train workers; the run is named by ``run``."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    parent, name = run.path.rstrip("/").rsplit("/", 1)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg.to_dict(), **loop_config},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=run.filesystem,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    remove_unregistered_checkpoints(run)
    result = trainer.fit()
    remove_unregistered_checkpoints(run)
    return result


def remove_unregistered_checkpoints(run: Location) -> list[str]:
    """Delete ``checkpoint_*`` folders that Ray Train never registered.

    Ray Train uploads a checkpoint folder and only then records it in
    ``checkpoint_manager_snapshot.json``; a worker or driver killed mid-upload leaves a partial
    folder that no resume will load. Checkpoints pruned by ``num_to_keep`` can also survive on S3
    (the prune's folder delete finds no folder marker there). Removing both before and after each
    run keeps only complete, registered checkpoints on storage. Returns the names removed.
    """
    import pyarrow.fs as pafs

    try:
        snapshot = json.loads(read_bytes(run.join("checkpoint_manager_snapshot.json")))
        registered = {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}
    except FileNotFoundError:
        registered = set()
    infos = run.filesystem.get_file_info(pafs.FileSelector(run.path, allow_not_found=True))
    removed = []
    for info in infos:
        name = info.base_name
        if info.type == pafs.FileType.Directory and name.startswith("checkpoint_") and name not in registered:
            # S3 folders are key prefixes: delete the keys, then the (possibly absent) marker.
            run.filesystem.delete_dir_contents(info.path, missing_dir_ok=True)
            try:
                run.filesystem.delete_dir(info.path)
            except FileNotFoundError:
                pass
            removed.append(name)
    if removed:
        print(f"[train] removed {len(removed)} checkpoint folder(s) Ray Train has not registered: {', '.join(sorted(removed))}")
    return removed


def _export(result, run: Location, models: dict[str, str], info: dict, extra_dirs: dict[str, str] | None = None) -> None:
    """Publish the final checkpoint's models as diffusers folders, plus curves and run.json."""
    if result.checkpoint is None:
        raise HistodiffError(f"the run at {run} finished without a checkpoint; check its logs")
    with result.checkpoint.as_directory() as folder:
        for src, dst in models.items():
            upload_dir(os.path.join(folder, src), run.join("model", dst))
        with open(os.path.join(folder, "metrics.csv"), "rb") as f:
            write_atomic(run.join("metrics.csv"), f.read())
        upload_dir(os.path.join(folder, "tensorboard"), run.join("tensorboard"))
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
    for dst, local in (extra_dirs or {}).items():
        upload_dir(local, run.join("model", dst))
    if state["history"]:
        title = f"{info['kind']} run {run.uri.rstrip('/').rsplit('/', 1)[-1]}"
        write_atomic(run.join("curves.png"), curves_png(state["history"], title))
    info = {**info, "step": state["step"], "final_metrics": state["history"][-1] if state["history"] else {}}
    write_atomic(run.join("run.json"), json.dumps(info, indent=1, sort_keys=True).encode())


def train_autoencoder(cfg: Config, tiles: list[str], run: str) -> dict:
    """Train the KL autoencoder on the train split of one or more tile sets (labels unused)."""
    init_ray(cfg)
    run_loc = open_location(run, cfg.storage)
    locs = [open_location(t, cfg.storage) for t in tiles]
    # Shuffled across the tile sets: streamed one after the other, the decoder tunes itself to the
    # last one. Val too, so that a checkpoint's first autoencoder.val_tiles are a random mix of all
    # sets (a different one each time: Ray Data's seeded shuffle still follows the order blocks
    # arrive in); the end of each phase is scored on all of them.
    train = read_tiles(locs, "train", augment=cfg.data.augment, shuffle=True)
    val = read_tiles(locs, "val", shuffle=True)
    result = fit(cfg, autoencoder_loop, {}, {"train": train, "val": val}, run_loc)
    _export(result, run_loc, {"vae": "vae"}, {"kind": "autoencoder", "tiles": [l.uri for l in locs], "config": cfg.to_dict()})
    per_set = write_reconstructions(run_loc, locs)
    info = {**read_run_info(run_loc), "val_by_tile_set": per_set}
    write_atomic(run_loc.join("run.json"), json.dumps(info, indent=1, sort_keys=True).encode())
    return info


def write_reconstructions(run: Location, tile_sets: list[Location], per_set: int = 16, columns: int = 8) -> dict:
    """Reconstruction quality of the finished autoencoder on the whole val split of each tile set
    (PSNR, SSIM, colour error: the mean absolute difference of the tile's mean R, G, B in grey levels),
    returned by tile set; and RUN/reconstructions.png: the first val tiles of each set, each row of
    reals followed by the row of their reconstructions (posterior mean, decoded)."""
    import numpy as np
    import torch

    from histodiff_ray.data.tiles import decode_images, load_tile_table
    from histodiff_ray.ldm import save_png, tile_grid
    from histodiff_ray.metrics import psnr, ssim
    from histodiff_ray.models.autoencoder import load_autoencoder

    with tempfile.TemporaryDirectory(prefix="vae-") as tmp:
        vae = load_autoencoder(download_dir(run.join("model", "vae"), tmp)).eval()

    def reconstruct(tiles: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(tiles), 256):
                x = torch.from_numpy(tiles[start:start + 256]).permute(0, 3, 1, 2).float() / 127.5 - 1
                recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
                out.append(((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
        return np.concatenate(out) if out else tiles

    scores, shown = {}, []
    for loc in tile_sets:
        tiles = decode_images(load_tile_table(loc, "val", columns=["image"]).column("image"))
        if not len(tiles):
            continue
        recon = reconstruct(tiles)
        a, b = (torch.from_numpy(t).permute(0, 3, 1, 2).float() / 255 for t in (tiles, recon))
        colour = (a.mean(dim=(2, 3)) - b.mean(dim=(2, 3))).abs().mean() * 255
        scores[loc.uri] = {"val_tiles": len(tiles), "psnr": psnr(a, b).mean().item(), "ssim": ssim(a, b).mean().item(),
                           "colour_error": colour.item()}
        shown.append((tiles[:per_set], recon[:per_set]))
    real = np.concatenate([t for t, _ in shown])
    recon = np.concatenate([r for _, r in shown])
    blank = np.full((columns, *real.shape[1:]), 255, np.uint8)  # pads a short last row, so reals sit above their own

    def row(tiles):
        return np.concatenate([tiles, blank[:columns - len(tiles)]])

    rows = [row(block[start:start + columns]) for start in range(0, len(real), columns) for block in (real, recon)]
    save_png(tile_grid(np.concatenate(rows), columns=columns), run.join("reconstructions.png"))
    return scores


def _union(datasets: list):
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def mix_by_weight(parts: list[tuple[object, int, float]]):
    """One epoch that draws from each (dataset, rows, weight) part in proportion to its weight:
    a part is repeated (whole copies plus a random sample) to weight × total rows; in a fresh
    random order at every pass (the parts would otherwise stream one after the other)."""
    total_rows = sum(rows for _, rows, _ in parts)
    total_weight = sum(w for _, _, w in parts)
    pieces = []
    for ds, rows, weight in parts:
        share = weight / total_weight * total_rows / rows
        whole, fraction = int(share), share - int(share)
        pieces += [ds] * whole
        if fraction > 1e-3:
            pieces.append(ds.random_sample(fraction))
    return _union(pieces).random_shuffle()


def pretrain(cfg: Config, latents: list[tuple[str, float]], run: str, *, finetune_from: str | None = None,
             pseudo_labels_from: str | None = None) -> dict:
    """DDPM training of the latent UNet on one or more latent sets mixed by weight; with
    ``finetune_from`` (a finished diffusion run) it continues from that run's EMA weights with
    the fine-tuning LR and step budget. A fine-tune with ``guidance.kind: classifier_free`` adds a
    class embedding and trains on the latent sets' labels (one labeled set; its classes are
    recorded in run.json), and with ``pseudo_labels_from`` (a judge) on its pseudo-labels too;
    otherwise labels are unused."""
    from diffusers import DDPMScheduler

    init_ray(cfg)
    run_loc = open_location(run, cfg.storage)
    locs = [open_location(uri, cfg.storage) for uri, _ in latents]
    manifests = [load_latent_manifest(loc) for loc in locs]
    autoencoders = {m["autoencoder"] for m in manifests}
    if len(autoencoders) != 1:
        raise HistodiffError(f"latent sets were encoded by different autoencoders {sorted(autoencoders)}; encode them with one")
    vae_dir = autoencoders.pop()
    init_weights, scale_factor, parent, classes = None, manifests[0]["scale_factor"], None, None
    if finetune_from is not None:
        parent_loc = open_location(finetune_from, cfg.storage)
        parent = read_run_info(parent_loc)
        if parent.get("autoencoder") != vae_dir:
            raise HistodiffError(f"{finetune_from} was trained on latents of {parent.get('autoencoder')}, not {vae_dir}")
        scale_factor = parent["scale_factor"]  # keep the pre-trained model's input scale
        init_weights = _load_unet_weights(parent_loc)
        if cfg.guidance.kind == "classifier_free":
            classes = [m["classes"] for m in manifests if m.get("classes")]
            if len(classes) != 1 or sum(sum(m["labeled_train"].values()) for m in manifests) == 0:
                raise HistodiffError("guidance.kind=classifier_free fine-tunes on the labels of exactly one labeled latent set; "
                                     f"got {len(classes)} labeled sets among {[loc.uri for loc in locs]}")
            classes = classes[0]
    pseudo, pseudo_summary = None, None
    if pseudo_labels_from is not None:
        if classes is None:
            raise HistodiffError("--pseudo-labels serves a class-conditional fine-tune: set guidance.kind=classifier_free")
        from histodiff_ray.judge import pseudo_labels

        tiles = next(m["tiles"] for m in manifests if m.get("classes"))
        pseudo, pseudo_summary = pseudo_labels(cfg, pseudo_labels_from, tiles)
    # Latents are small (a few KB per tile): materialising them once spares every epoch a re-read.
    parts = [(read_latents(loc, "train", pseudo_labels=pseudo).materialize(), sum(m["counts"]["train"].values()), w)
             for loc, m, (_, w) in zip(locs, manifests, latents)]
    loop_config = {"latent_shape": manifests[0]["latent_shape"], "scale_factor": scale_factor,
                   "init_weights": init_weights, "finetune": finetune_from is not None,
                   "num_classes": len(classes) if classes else None}
    result = fit(cfg, diffusion_loop, loop_config, {"train": mix_by_weight(parts)}, run_loc)
    d = cfg.diffusion
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(prefix="vae-") as vae_tmp:
        DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                      beta_schedule=d.beta_schedule, clip_sample=False).save_pretrained(tmp)
        vae_local = download_dir(open_location(vae_dir, cfg.storage), vae_tmp)
        _export(result, run_loc, {"unet_ema": "unet"}, {
            "kind": "ldm", "autoencoder": vae_dir, "scale_factor": scale_factor, "latent_shape": manifests[0]["latent_shape"],
            "latents": [{"uri": loc.uri, "weight": w} for loc, (_, w) in zip(locs, latents)],
            "finetuned_from": finetune_from, "classes": classes, "pseudo_labels": pseudo_summary, "config": cfg.to_dict(),
        }, extra_dirs={"scheduler": tmp, "vae": vae_local})
    return read_run_info(run_loc)


def _load_unet_weights(run: Location) -> dict:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        local = download_dir(run.join("model", "unet"), tmp)
        return load_file(os.path.join(local, "diffusion_pytorch_model.safetensors"))


def train_classifier(cfg: Config, latents: str, ldm_run: str, run: str, pseudo_labels_from: str | None = None) -> dict:
    """Train the noise-aware latent classifier that guides sampling from ``ldm_run``: on the
    labeled train latents, at the diffusion model's latent scale and noise schedule. With
    ``pseudo_labels_from`` (a judge) it also learns the judge's class probabilities on every
    unlabeled train tile (knowledge distillation, Hinton et al. 2015): all of them carry signal,
    where a confidence threshold keeps a third and only the judge's easy cases."""
    from histodiff_ray.train.loops import classifier_loop

    init_ray(cfg)
    run_loc, latents_loc = open_location(run, cfg.storage), open_location(latents, cfg.storage)
    manifest = load_latent_manifest(latents_loc)
    ldm = read_run_info(open_location(ldm_run, cfg.storage))
    if ldm.get("autoencoder") != manifest["autoencoder"]:
        raise HistodiffError(f"{latents} was encoded by {manifest['autoencoder']}, but {ldm_run} "
                             f"generates latents of {ldm.get('autoencoder')}; encode the labeled tiles with that autoencoder")
    labeled = sum(manifest["labeled_train"].values())
    batch_size = cfg.classifier.batch_size or cfg.data.batch_size
    if labeled < batch_size * cfg.ray.num_workers:
        key = "classifier.batch_size" if cfg.classifier.batch_size else "data.batch_size"
        raise HistodiffError(f"{latents} has {labeled} labeled train tiles, fewer than one batch per worker "
                             f"({key}={batch_size} × ray.num_workers={cfg.ray.num_workers}); lower {key}")
    classes = manifest["classes"]
    soft, pseudo_summary = None, None
    if pseudo_labels_from is not None:
        from histodiff_ray.judge import judge_probabilities

        soft, pseudo_summary = judge_probabilities(cfg, pseudo_labels_from, manifest["tiles"])
    loop_config = {"latent_shape": manifest["latent_shape"], "scale_factor": ldm["scale_factor"], "num_classes": len(classes)}
    if cfg.classifier.init_from_unet:
        loop_config["unet"] = ldm["config"]["unet"]
        from histodiff_ray.models.classifier import UNET_ENCODER

        weights = _load_unet_weights(open_location(ldm_run, cfg.storage))
        loop_config["init_weights"] = {k: v for k, v in weights.items() if k.startswith(UNET_ENCODER)}
    datasets = {"train": read_latents(latents_loc, "train", labeled_only=True, soft_labels=soft).materialize(),
                "val": read_latents(latents_loc, "val").materialize()}
    result = fit(cfg, classifier_loop, loop_config, datasets, run_loc)
    _export(result, run_loc, {"classifier": "classifier"}, {
        "kind": "classifier", "latents": latents_loc.uri, "ldm": ldm_run, "autoencoder": manifest["autoencoder"],
        "classes": classes, "scale_factor": ldm["scale_factor"], "latent_shape": manifest["latent_shape"],
        "pseudo_labels": pseudo_summary, "config": cfg.to_dict(),
    })
    return read_run_info(run_loc)
