"""Tile classifiers on pixels (timm models built from config, never downloaded weights).

One trainer serves two roles: the *judge* that scores synthetic tiles for selection (trained on the
real labeled tiles) and the downstream classifier of the evaluation. Training (AdamW, a one-cycle LR
over a fixed budget of optimizer steps) keeps the scored epoch with the best val macro-F1 (val is
scored every ``val_every`` epochs and after the last; early stopping with ``patience``): the test
split is never seen here.

    model, history = train_tile_classifier(train_x, train_y, val_x, val_y, cfg.downstream, num_classes=5, seed=0)
    probs, features = predict(model, tiles)
"""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models import get_pretrained_cfg

from histodiff_ray.augment import dihedral, random_dihedral, random_stain_jitter
from histodiff_ray.config import DownstreamConfig
from histodiff_ray.metrics import macro_f1  # noqa: F401  (sklearn macro-F1, zero_division=0; re-exported)
from histodiff_ray.models import default_device, to_tensor


def build_tile_classifier(arch: str, num_classes: int, tile_size: int | None) -> torch.nn.Module:
    """A timm model from random weights. Models that timm marks ``fixed_input_size`` (vision
    transformers) are built for ``tile_size``; convolutional models take any size."""

    pretrained_cfg = get_pretrained_cfg(arch)
    fixed_size = {"img_size": tile_size} if pretrained_cfg and pretrained_cfg.fixed_input_size and tile_size else {}
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **fixed_size)
    # Channels-last, as to_tensor's NHWC views already are: oneDNN's fast convolution path (~1.15x here).
    return model.to(memory_format=torch.channels_last)


def classic_augment(
    x: torch.Tensor, generator: torch.Generator, colour: bool = True, stain: float = 0.05, jitter: float = 0.1
) -> torch.Tensor:
    """Augmentation for H&E tiles in [-1, 1]. Always a random rotation by k·90° and flip (tissue has
    no orientation: every arm of an evaluation gets it). With ``colour``: HED stain jitter of ±``stain``
    (Tellez et al. 2019), then brightness / contrast / saturation jitter of ±``jitter`` (scanner
    variation)."""
    out = random_dihedral(x, generator)
    if not colour:
        return out
    if stain > 0:
        out = random_stain_jitter(out, stain, generator)
    if jitter > 0:
        b, c, s = (1 + jitter * (2 * torch.rand(3, len(x), 1, 1, 1, generator=generator) - 1)).unbind(0)
        grey = out.mean(dim=1, keepdim=True)
        out = grey + s * (out - grey)  # saturation
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (mean + c * (out - mean)) * b  # contrast, then brightness
        out = out.clamp(-1, 1)
    return out


@torch.no_grad()
def predict(
    model: torch.nn.Module, tiles: np.ndarray, batch_size: int = 256, tta: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N×K) and penultimate features (N×D) of uint8 tiles. With ``tta``, both
    are averaged over the tile's eight rotations and flips (test-time augmentation: 8× the cost)."""
    model.eval()
    device = next(model.parameters()).device
    probs, feats = [], []
    for start in range(0, len(tiles), batch_size):
        x = to_tensor(tiles[start : start + batch_size]).to(device)
        p = f = 0
        views = range(8) if tta else [0]
        for k in views:
            features = model.forward_head(model.forward_features(dihedral(x, k)), pre_logits=True)
            p, f = p + F.softmax(model.get_classifier()(features), dim=1) / len(views), f + features / len(views)
        probs.append(p.float().cpu().numpy())
        feats.append(f.float().cpu().numpy())
    k = model.num_classes
    return (
        np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
        np.concatenate(feats) if feats else np.zeros((0, model.num_features), np.float32),
    )


def index_batches(n: int, size: int, generator: torch.Generator):
    """Endless batches of ``size`` indices into ``n`` tiles: successive random permutations, cut
    into batches across their boundaries, so every batch is full and every tile comes once a pass."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        while len(order) < size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:size]
        order = order[size:]


def step_budget(cfg: DownstreamConfig, budget_tiles: int) -> tuple[int, int]:
    """(batch size, steps per epoch) for ``cfg.epochs`` passes over ``budget_tiles`` tiles: the same
    for every training set that shares the budget, whatever its own size."""
    batch = min(cfg.batch_size, budget_tiles)
    return batch, math.ceil(budget_tiles / batch)


def train_tile_classifier(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    cfg: DownstreamConfig,
    num_classes: int,
    seed: int,
    colour_augment: bool = True,
    budget_tiles: int | None = None,
    init: torch.nn.Module | None = None,
    log=None,
) -> tuple[torch.nn.Module, list[dict]]:
    """Train on uint8 tiles; returns the model at its best val macro-F1 epoch and the history.

    The budget is optimizer steps, not tiles: an *epoch* is ceil(``budget_tiles`` / batch size)
    steps of the same batch size (``budget_tiles`` defaults to the number of training tiles; see
    step_budget), ``cfg.epochs`` of them under one one-cycle schedule. The evaluation passes the
    real labeled count for every arm, so an arm with synthetic tiles gets the same steps as the
    real one, not more. ``init``: start from a copy of this model's weights (a second phase of
    training) instead of random ones. Val is scored every ``cfg.val_every`` epochs and after the
    last (scoring the 1,288 val tiles of crc5 every epoch costs ~40 % of a run); training stops
    once ``cfg.patience`` scored epochs in a row bring no better val macro-F1."""
    if len(train_x) < 2:
        raise ValueError(f"a tile classifier needs at least 2 training tiles (BatchNorm), got {len(train_x)}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(init) if init is not None else build_tile_classifier(cfg.arch, num_classes, train_x.shape[1])
    device = default_device()
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_all, y_all = (
        to_tensor(train_x),
        torch.from_numpy(np.array(train_y, dtype=np.int64)),
    )  # a copy: Ray hands out read-only arrays
    batch, steps_per_epoch = step_budget(cfg, budget_tiles or len(x_all))
    # One-cycle LR over the whole budget (warm-up, then cosine annealing to ~0): with a few hundred
    # labels a constant LR leaves the val score noisy from epoch to epoch.
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    batches = index_batches(len(x_all), batch, g)
    best, best_state, history, since_best = -1.0, None, [], 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        losses = []
        for _ in range(steps_per_epoch):
            idx = next(batches)
            # Augmented on the CPU with the run's generator (the same draws on any device), then moved.
            x = classic_augment(x_all[idx], g, colour=colour_augment, stain=cfg.stain_jitter, jitter=cfg.colour_jitter)
            loss = F.cross_entropy(model(x.to(device, non_blocking=True)), y_all[idx].to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        if epoch % cfg.val_every and epoch < cfg.epochs:
            continue
        probs, _ = predict(model, val_x)
        pred = probs.argmax(1)
        row = {
            "epoch": epoch,
            "step": epoch * steps_per_epoch,
            "loss": float(np.mean(losses)),
            "val_acc": float(np.mean(pred == val_y)),
            "val_macro_f1": macro_f1(val_y, pred, num_classes),
        }
        history.append(row)
        if log:
            log(row)
        if row["val_macro_f1"] > best:
            best, best_state, since_best = row["val_macro_f1"], copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, history


def save_tile_classifier(
    model: torch.nn.Module, arch: str, classes: list[str], tile_size: int, folder: str, extra: dict | None = None
) -> None:

    os.makedirs(folder, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        os.path.join(folder, "model.safetensors"),
    )
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(
            {
                "architecture": arch,
                "num_classes": len(classes),
                "classes": classes,
                "tile_size": tile_size,
                **(extra or {}),
            },
            f,
            indent=1,
        )


def load_tile_classifier(folder: str) -> tuple[torch.nn.Module, dict]:

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    model = build_tile_classifier(config["architecture"], config["num_classes"], config.get("tile_size"))
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    return model.eval(), config
