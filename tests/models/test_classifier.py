"""The noise-aware latent classifier: shapes for the profiles, both poolings, time conditioning,
diffusers save/load round trip, and config validation."""

import pytest
import torch

from histodiff_ray.config import ConfigError, load_config
from histodiff_ray.models.classifier import NoiseAwareClassifier, build_classifier

CPU = load_config("cpu")
LATENT_SIZE = CPU.data.tile_size // CPU.autoencoder.downsample_factor  # 16
LATENT_CHANNELS = CPU.autoencoder.latent_channels  # 8


# Fixed sizes, so the expected shapes below do not follow edits of the cpu profile.
SIZES = [
    "classifier.width=64",
    "classifier.num_heads=4",
    "classifier.channel_mult=1,2,2",
    "classifier.attention_resolutions=4",
]


def cpu_classifier(pool="attention", seed=0):
    torch.manual_seed(seed)
    cfg = load_config("cpu", SIZES + [f"classifier.pool={pool}"]).classifier
    return build_classifier(cfg, LATENT_CHANNELS, LATENT_SIZE, num_classes=5).eval()


def inputs(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=g), torch.randint(
        0, 1000, (n,), generator=g
    )


@pytest.mark.parametrize("pool", ["attention", "mean"])
def test_cpu_profile_shapes_and_forward_is_head_of_features(pool):
    model = cpu_classifier(pool)
    assert (LATENT_SIZE, LATENT_CHANNELS) == (16, 8)
    z, t = inputs()
    with torch.no_grad():
        logits, feats = model(z, t), model.features(z, t)
    width, mult = 64, [1, 2, 2]
    assert logits.shape == (8, 5) and logits.dtype == torch.float32
    assert feats.shape == (8, width * mult[-1]) == (8, model.feature_dim)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, model.head(feats))
    assert (model.attn_pool is not None) == (pool == "attention")
    # Samples are classified independently: no batch statistics anywhere.
    with torch.no_grad():
        torch.testing.assert_close(model(z[3:4], t[3:4]), logits[3:4], rtol=1e-4, atol=1e-5)
    # A scalar timestep is broadcast over the batch.
    with torch.no_grad():
        torch.testing.assert_close(model(z, torch.tensor(500)), model(z, torch.full((8,), 500)))


def test_the_levels_follow_channel_mult_and_attention_resolutions():
    model = cpu_classifier()
    # depth 1 per level, attention at rate 4 (the last level), ResBlock downsampling in between.
    assert [type(b).__name__ for b in model.down_blocks] == ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]
    assert [b.downsamplers is not None for b in model.down_blocks] == [True, True, False]
    assert [len(b.resnets) for b in model.down_blocks] == [1, 1, 1]
    assert model.attn_pool.pos.shape == (4 * 4 + 1, 128)  # 16 / 2**2 = 4; mean token + 16 positions
    # num_heads is the count at the base width (head size 64 / 4 = 16): 128 channels get 8 heads.
    assert model.attn_pool.attn.num_heads == 8 and model.mid_block.attentions[0].heads == 8


def test_init_from_unet_copies_the_denoisers_encoder_half_and_refuses_another_architecture():
    from histodiff_ray.models.unet import build_unet

    cfg = load_config(
        "cpu", ["unet.base_channels=32", "unet.channel_mult=1,2", "unet.attention_resolutions=2", "unet.num_heads=2"]
    )
    torch.manual_seed(0)
    unet = build_unet(cfg.unet, LATENT_SIZE, LATENT_CHANNELS)
    classifier = build_classifier(cfg.classifier, LATENT_CHANNELS, LATENT_SIZE, num_classes=5, unet=cfg.unet)
    classifier.init_from_unet(unet.state_dict())
    z, t = inputs(2)
    with torch.no_grad():  # the same features as the UNet's own down path and middle block
        emb = unet.time_embedding(unet.time_proj(t))
        h = unet.conv_in(z)
        for block in unet.down_blocks:
            h, _ = block(hidden_states=h, temb=emb)
        h = unet.mid_block(h, emb)
        emb_c = classifier.time_embedding(classifier.time_proj(t))
        h_c = classifier.conv_in(z)
        for block in classifier.down_blocks:
            h_c, _ = block(hidden_states=h_c, temb=emb_c)
        torch.testing.assert_close(classifier.mid_block(h_c, emb_c), h)
    with pytest.raises(ValueError, match="do not fit this classifier"):
        cpu_classifier().init_from_unet(unet.state_dict())  # width 64, not the UNet's 32


@pytest.mark.parametrize("pool", ["attention", "mean"])
def test_logits_depend_on_the_timestep(pool):
    model = cpu_classifier(pool)
    z, _ = inputs()
    with torch.no_grad():
        a = model(z, torch.full((8,), 10))
        b = model(z, torch.full((8,), 900))
    assert (a - b).abs().max() > 1e-3


def test_save_pretrained_round_trip_is_exact(tmp_path):
    model = cpu_classifier(seed=3)
    with torch.no_grad():  # move every weight off its initial value so a silent re-init would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "clf", safe_serialization=True)
    assert (tmp_path / "clf" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "clf").glob("*.bin"))
    loaded = NoiseAwareClassifier.from_pretrained(tmp_path / "clf").eval()
    assert loaded.config.channel_mult == [1, 2, 2] and loaded.config.num_heads == 4
    assert loaded.config.pool == "attention" and loaded.config.num_classes == 5
    z, t = inputs(4, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(z, t), model(z, t))
        assert torch.equal(loaded.features(z, t), model.features(z, t))


def test_a_folder_whose_weights_do_not_all_fit_is_refused_not_half_loaded(tmp_path):
    from safetensors.torch import load_file, save_file

    from histodiff_ray.models.classifier import load_classifier

    cpu_classifier().save_pretrained(tmp_path / "clf", safe_serialization=True)
    assert isinstance(load_classifier(str(tmp_path / "clf")), NoiseAwareClassifier)
    weights = tmp_path / "clf" / "diffusion_pytorch_model.safetensors"
    # An older layout's names (down.*, mid.*, time_embed.*) would leave these layers at random.
    save_file({k.replace("down_blocks.", "down."): v for k, v in load_file(weights).items()}, weights)
    with pytest.raises(ValueError, match="does not fit this version's layout"):
        load_classifier(str(tmp_path / "clf"))


def test_paper_profile_builds_the_official_guide():
    # HistoDiffAug's guide is guided-diffusion's classifier for 256 px images fed 64x64 latents: six
    # levels (64 down to 2 px), attention at downsample rates 8 and 16, heads of 64 channels.
    cfg = load_config("paper")
    assert cfg.classifier.channel_mult == [1, 1, 2, 2, 4, 4] and cfg.classifier.num_heads == 2
    latent = cfg.data.tile_size // cfg.autoencoder.downsample_factor
    model = build_classifier(cfg.classifier, cfg.autoencoder.latent_channels, latent, num_classes=3)
    assert model.feature_dim == 128 * 4
    assert model.attn_pool.pos.shape == ((64 // 32) ** 2 + 1, 512)
    assert model.attn_pool.attn.num_heads == 8  # head size 64, as guided-diffusion's num_head_channels


@pytest.mark.parametrize(
    "override, key",
    [
        ("classifier.channel_mult=[]", "classifier.channel_mult"),
        ("classifier.channel_mult=[1, 0, 2]", "classifier.channel_mult"),
        ("classifier.channel_mult=[1, 2, 2, 2, 2, 2]", "classifier.channel_mult"),  # 5 halvings of 16
        ("classifier.num_heads=0", "classifier.num_heads"),
        ("classifier.num_heads=5", "classifier.num_heads"),  # does not divide the width
        ("classifier.attention_resolutions=[8]", "classifier.attention_resolutions"),  # only rates 1, 2, 4
    ],
)
def test_config_rejects_bad_values_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"config: {key}="):
        load_config("cpu", [override])


def test_config_accepts_good_values():
    cfg = load_config(
        "cpu",
        [
            "classifier.width=64",
            "classifier.channel_mult=1,2",
            "classifier.num_heads=8",
            "classifier.attention_resolutions=[1,2]",
        ],
    )
    assert cfg.classifier.channel_mult == [1, 2] and cfg.classifier.num_heads == 8
