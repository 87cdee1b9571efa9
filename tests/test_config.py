import pytest
import yaml

from histodiff_ray.config import PROFILE_DIR, Config, ConfigError, load_config


def test_cpu_profile_maps_64px_tiles_to_16x16x8_latents():
    cfg = load_config("cpu")
    assert cfg.data.tile_size == 64
    assert cfg.data.tile_size // cfg.autoencoder.downsample_factor == 16
    assert cfg.autoencoder.latent_channels == 8
    assert 0 < cfg.ray.cpus_per_worker < 1


def test_paper_profile_has_the_papers_settings():
    cfg = load_config("paper")
    assert cfg.data.tile_size == 256
    ae = cfg.autoencoder
    assert (ae.latent_channels, ae.block_out_channels, ae.layers_per_block) == (3, [128, 256, 512], 2)
    assert cfg.data.tile_size // ae.downsample_factor == 64
    u = cfg.unet
    assert (u.base_channels, u.channel_mult, u.attention_resolutions, u.num_heads, u.layers_per_block) == (
        192,
        [1, 2, 2, 4, 4],
        [1, 2, 4, 8],
        8,
        2,
    )
    assert u.resnet_time_scale_shift == "scale_shift" and u.resblock_updown
    d = cfg.diffusion
    assert (d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end, d.loss, d.lr, d.warmup_steps) == (
        1000,
        "scaled_linear",
        0.0015,
        0.0155,
        "l1",
        5e-5,
        10_000,
    )
    # Budgets the profile used to leave at the defaults (2,000 autoencoder steps at lr 4.5e-6: untrained).
    assert (ae.lr, ae.max_steps, ae.warmup_steps, ae.decoder_steps) == (4.5e-6, 50_000, 0, 0)
    # LDM's PatchGAN: disc_start 50,001, disc_weight 0.5, the same LR, 3 layers of 64 channels.
    assert (ae.gan_steps, ae.gan_lr, ae.gan_weight, ae.gan_channels, ae.gan_layers) == (50_000, 4.5e-6, 0.5, 64, 3)
    assert (d.finetune_lr, d.finetune_warmup_steps, d.finetune_steps, d.min_snr_gamma) == (5e-5, 10_000, 50_000, 0.0)
    c = cfg.classifier
    assert (c.width, c.depth, c.channel_mult, c.attention_resolutions, c.num_heads, c.pool, c.lr, c.weight_decay) == (
        128,
        2,
        [1, 1, 2, 2, 4, 4],
        [8, 16],
        2,
        "attention",
        5e-5,
        0.05,
    )
    assert (c.warmup_steps, c.max_steps) == (0, 10_000)
    # The official global batches (autoencoder 48, LDM 16, guide 32) over 8 Train workers.
    w = cfg.ray.num_workers
    assert (ae.batch_size * w, d.batch_size * w, c.batch_size * w) == (48, 16, 32)
    s = cfg.sampling
    assert (s.ddim_steps, s.eta, s.guidance_scale) == (50, 1.0, 10.0)
    assert cfg.selection.max_per_class == 500


def test_dotted_overrides_are_typed():
    cfg = load_config(
        "cpu",
        [
            "data.label_fraction=0.05",
            "unet.channel_mult=1,2,2,2",
            "data.augment=false",
            "storage.endpoint_url=http://127.0.0.1:9000",
            "diffusion.lr=1e-4",
            "ray.address=null",
            "diffusion.max_steps=1e3",
            "autoencoder.batch_size=8",
        ],
    )
    assert cfg.data.label_fraction == 0.05
    assert cfg.unet.channel_mult == [1, 2, 2, 2]
    assert cfg.data.augment is False
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"
    assert cfg.diffusion.lr == 1e-4
    assert cfg.ray.address is None
    assert cfg.diffusion.max_steps == 1000 and isinstance(cfg.diffusion.max_steps, int)
    assert cfg.autoencoder.batch_size == 8


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.tile_sise=64", ["data.tile_sise", "tile_size"]),  # unknown key: names the allowed ones
        ("nosuch.key=1", ["nosuch", "data"]),
        ("data.label_fraction=1.5", ["data.label_fraction", "1.5", "(0, 1]"]),
        ("data.tile_size=abc", ["data.tile_size", "abc", "integer"]),
        ("data.tile_size=60", ["data.tile_size", "60", "multiple of 8"]),
        ("diffusion.loss=huber", ["diffusion.loss", "huber", "'l1' or 'l2'"]),
        ("data.augment=maybe", ["data.augment", "maybe", "true or false"]),
        ("storage.endpoint_url=localhost:9000", ["storage.endpoint_url", "http://"]),
        ("data=5", ["data", "mapping"]),
        ("diffusion.max_steps=2.5", ["diffusion.max_steps=2.5", "an integer >= 1"]),
        ("data.augment.flips=1", ["data.augment", "true or false"]),
        ("autoencoder.batch_size=0", ["autoencoder.batch_size=0", "an integer >= 1, or null"]),
        ("sampling.ddim_steps=1001", ["sampling.ddim_steps=1001", "an integer in [1, 1000]"]),
        ("unet.channel_mult=1,0,2", ["unet.channel_mult=[1, 0, 2]", "a non-empty list of integers >= 1"]),
        (
            "evaluate.arms=real,best",
            ["evaluate.arms=['real', 'best']", "drawn from ['real', 'real+aug', 'pseudo-label']"],
        ),
        ("evaluate.label_fractions=0.05,0.05", ["evaluate.label_fractions", "distinct"]),
        ("data.val_fraction=0.9", ["data.val_fraction+test_fraction", "below 1"]),
        ("sampling.karras_sigmas=true", ["sampling.karras_sigmas", "false with sampling.sampler=ddim"]),
        ("data.label_fraction", ["section.key=value"]),
    ],
)
def test_bad_keys_and_values_name_the_key_the_value_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("cpu", [override])
    for text in expected:
        assert text in str(err.value)


def test_yaml_file_with_an_unknown_key_or_a_bad_value_fails(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  tile_size: 64\n  colour: pink\n")
    with pytest.raises(ConfigError, match="data.colour"):
        load_config(str(path))
    path.write_text("diffusion:\n  loss: huber\n")
    with pytest.raises(ConfigError, match=r"diffusion.loss='huber' is not allowed; expected 'l1' or 'l2'"):
        load_config(str(path))
    path.write_text("ray:\n  cpus_per_worker: true\n")  # a boolean is not a number
    with pytest.raises(ConfigError, match=r"ray.cpus_per_worker=True is not allowed; expected a number > 0"):
        load_config(str(path))
    path.write_text("storage:\n  secret_access_key: [not, text]\n")  # an error never shows a secret
    with pytest.raises(ConfigError, match=r"storage.secret_access_key=\*\*\* is not allowed") as err:
        load_config(str(path))
    assert "not" not in str(err.value).split("expected")[0].replace("is not allowed", "")
    path.write_text("profile: 2024\nseed: 1.0e+3\nstorage:\n  region: 1\n")  # YAML scalars where text is wanted
    cfg = load_config(str(path))
    assert (cfg.profile, cfg.seed, cfg.storage.region) == ("2024", 1000, "1")


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match="cpu"):
        load_config("gpu-huge")


def test_secrets_never_appear_in_repr_or_dict():
    cfg = load_config("cpu", ["storage.access_key_id=AKIA-SECRET-ID", "storage.secret_access_key=s3cr3t-value"])
    assert "s3cr3t-value" not in repr(cfg) and "AKIA-SECRET-ID" not in repr(cfg)
    assert "s3cr3t-value" not in str(cfg.to_dict())
    assert cfg.storage.secret_access_key == "s3cr3t-value"


def test_config_hash_is_stable_and_ignores_secrets():
    a = load_config("cpu", ["storage.secret_access_key=one"])
    b = load_config("cpu", ["storage.secret_access_key=two"])
    assert a.hash() == b.hash()
    assert a.hash() != load_config("cpu", ["data.tile_size=128"]).hash()


def test_the_cpu_profile_holds_only_what_differs_from_the_defaults():
    # One source of defaults: config.py's are the cpu recipe, so cpu.yaml restates none of them (a
    # value restated in two places drifts).
    restated = []
    defaults = Config()
    for section, values in yaml.safe_load((PROFILE_DIR / "cpu.yaml").read_text()).items():
        if isinstance(values, dict):
            restated += [f"{section}.{k}" for k, v in values.items() if getattr(getattr(defaults, section), k) == v]
        elif section != "profile" and getattr(defaults, section) == values:
            restated.append(section)
    assert restated == []
