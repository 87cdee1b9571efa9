"""The tile classifier shared by the judge and the evaluation: augmentation, early stopping on val,
save / load."""

import numpy as np
import pytest
import torch

from histodiff_ray.config import DownstreamConfig
from histodiff_ray.downstream import (
    classic_augment,
    load_tile_classifier,
    predict,
    save_tile_classifier,
    step_budget,
    train_tile_classifier,
)
from histodiff_ray.models import to_tensor


def _two_stains(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 haematoxylin-blue, class 1 eosin-pink tiles with noise: separable by colour."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    base = np.where(y[:, None] == 0, [[70, 60, 160]], [[220, 120, 170]])
    x = base[:, None, None, :] + rng.normal(0, 25, (n, 32, 32, 3))
    return np.clip(x, 0, 255).astype(np.uint8), y


def test_classic_augment_always_turns_and_flips_and_adds_colour_only_when_asked():
    x = to_tensor(_two_stains(8, 0)[0])
    plain = classic_augment(x, torch.Generator().manual_seed(0), colour=False)
    for src, out in zip(x, plain):
        views = [torch.rot90(src, r, dims=(1, 2)) for r in range(4)]
        views += [v.flip(2) for v in views]
        assert any(torch.equal(out, v) for v in views)
    assert not torch.equal(plain, x)  # the dihedral views are there without colour augmentation too
    coloured = classic_augment(x, torch.Generator().manual_seed(0))
    assert coloured.shape == x.shape and coloured.min() >= -1 and coloured.max() <= 1
    assert not torch.equal(coloured, plain)
    stain_only = classic_augment(x, torch.Generator().manual_seed(0), stain=0.05, jitter=0.0)
    assert not torch.equal(stain_only, plain) and not torch.equal(stain_only, coloured)


def test_the_step_budget_follows_budget_tiles_not_the_training_set():
    x, y = _two_stains(48, 3)
    cfg = DownstreamConfig(arch="resnet18", epochs=2, val_every=1, patience=2, batch_size=16, lr=1e-3, weight_decay=0.0)
    _, own = train_tile_classifier(x[:16], y[:16], x[:8], y[:8], cfg, num_classes=2, seed=0)
    _, more = train_tile_classifier(x, y, x[:8], y[:8], cfg, num_classes=2, seed=0, budget_tiles=16)
    # 16 real tiles, batch 16: one step an epoch, whether the arm holds 16 tiles or three times as many.
    assert [h["step"] for h in own] == [h["step"] for h in more] == [1, 2]
    _, uncapped = train_tile_classifier(x, y, x[:8], y[:8], cfg, num_classes=2, seed=0)
    assert [h["step"] for h in uncapped] == [3, 6]
    # Fewer budget tiles than a batch: every training set trains on batches of that many, not one
    # arm on small batches and another on full ones.
    assert step_budget(cfg, 10) == (10, 1) and step_budget(cfg, 40) == (16, 3)


def test_training_keeps_the_best_val_epoch_and_survives_save_and_load(tmp_path):
    train_x, train_y = _two_stains(32, 1)
    val_x, val_y = _two_stains(16, 2)
    cfg = DownstreamConfig(arch="resnet18", epochs=6, val_every=1, patience=1, batch_size=16, lr=1e-3, weight_decay=0.0)
    model, history = train_tile_classifier(train_x, train_y, val_x, val_y, cfg, num_classes=2, seed=0)
    f1s = [h["val_macro_f1"] for h in history]
    best = max(f1s)
    last_gain = f1s.index(best) + 1  # the epoch that last improved val macro-F1
    assert len(history) == min(cfg.epochs, last_gain + cfg.patience)  # early stopping, or the epoch budget
    probs, features = predict(model, val_x)
    from histodiff_ray.metrics import macro_f1

    assert macro_f1(val_y, probs.argmax(1), 2) == pytest.approx(best)  # the returned weights are the best epoch's
    assert best > 0.9  # colour alone separates the classes
    assert (
        probs.shape == (16, 2)
        and np.allclose(probs.sum(1), 1, atol=1e-5)
        and features.shape == (16, model.num_features)
    )

    save_tile_classifier(model, "resnet18", ["H", "E"], 32, str(tmp_path / "clf"))
    loaded, config = load_tile_classifier(str(tmp_path / "clf"))
    assert config["classes"] == ["H", "E"]
    np.testing.assert_allclose(predict(loaded, val_x)[0], probs, atol=1e-6)


def test_a_small_vit_is_selectable_at_the_tile_size(tmp_path):
    x, y = _two_stains(8, 4)
    cfg = DownstreamConfig(arch="vit_tiny_patch16_224", epochs=1, patience=1, batch_size=8, lr=1e-3, weight_decay=0.0)
    model, history = train_tile_classifier(x, y, x, y, cfg, num_classes=2, seed=0)
    assert len(history) == 1 and model.patch_embed.img_size == (32, 32)
    save_tile_classifier(model, cfg.arch, ["H", "E"], 32, str(tmp_path / "vit"))
    loaded, _ = load_tile_classifier(str(tmp_path / "vit"))
    np.testing.assert_allclose(predict(loaded, x)[0], predict(model, x)[0], atol=1e-5)


def test_val_is_scored_every_val_every_epochs_and_after_the_last():
    x, y = _two_stains(32, 5)
    cfg = DownstreamConfig(arch="resnet18", epochs=5, val_every=2, patience=5, batch_size=16, lr=1e-3, weight_decay=0.0)
    model, history = train_tile_classifier(x, y, x[:8], y[:8], cfg, num_classes=2, seed=0)
    assert [h["epoch"] for h in history] == [2, 4, 5] and [h["step"] for h in history] == [4, 8, 10]


def test_training_can_start_from_another_model_without_changing_it():
    x, y = _two_stains(32, 6)
    cfg = DownstreamConfig(arch="resnet18", epochs=1, val_every=1, patience=1, batch_size=16, lr=1e-3, weight_decay=0.0)
    first, _ = train_tile_classifier(x, y, x[:8], y[:8], cfg, num_classes=2, seed=0)
    before = {k: v.clone() for k, v in first.state_dict().items()}
    second, _ = train_tile_classifier(x, y, x[:8], y[:8], cfg, num_classes=2, seed=1, init=first)
    fresh, _ = train_tile_classifier(x, y, x[:8], y[:8], cfg, num_classes=2, seed=1)
    assert all(
        torch.equal(v, first.state_dict()[k]) for k, v in before.items()
    )  # the starting model is copied, not trained
    weight = "conv1.weight"
    # The second phase moved on from the first model's weights, not from a fresh initialisation.
    assert (second.state_dict()[weight] - before[weight]).abs().mean() < (
        fresh.state_dict()[weight] - before[weight]
    ).abs().mean()


def test_tta_averages_the_eight_rotations_and_flips():
    from histodiff_ray.augment import dihedral

    x, y = _two_stains(6, 7)
    cfg = DownstreamConfig(arch="resnet18", epochs=1, patience=1, batch_size=6, lr=1e-3, weight_decay=0.0)
    model, _ = train_tile_classifier(x, y, x, y, cfg, num_classes=2, seed=0)
    probs, features = predict(model, x, tta=True)
    views = [
        predict(model, dihedral(torch.from_numpy(x).permute(0, 3, 1, 2), k).permute(0, 2, 3, 1).numpy())
        for k in range(8)
    ]
    np.testing.assert_allclose(probs, np.mean([v[0] for v in views], axis=0), atol=1e-5)
    np.testing.assert_allclose(features, np.mean([v[1] for v in views], axis=0), atol=1e-4)
    # A turned tile gets the same TTA score as the tile itself.
    turned = np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2)))
    np.testing.assert_allclose(predict(model, turned, tta=True)[0], probs, atol=1e-5)
