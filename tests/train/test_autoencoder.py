"""The autoencoder stage on the S3 server: the decoder phases move the decoder alone, so the latents
stay as they were."""

import json

import torch
from safetensors.torch import load as load_safetensors

from histodiff_ray.storage import download_dir, list_files, open_location, read_bytes, upload_dir
from histodiff_ray.train.autoencoder import train_autoencoder
from tests.train.conftest import csv_rows


def test_decoder_phases_train_the_decoder_alone_so_the_latents_do_not_change(latents, tmp_path):
    # The session's autoencoder (tests/conftest.py) ran its joint phase, then the decoder phase, on two
    # DDP workers. An adversarial phase is then added to a copy of that finished run (autoencoder.gan_steps
    # raised, the same command re-run): it resumes at the last step with a fresh discriminator, two DDP
    # workers train decoder and discriminator in one backward, and the encoder never moves.
    cfg, bucket = latents
    run_uri = f"s3://{bucket}/runs/ae-adversarial"
    upload_dir(
        download_dir(open_location(f"s3://{bucket}/runs/ae", cfg.storage), str(tmp_path)),
        open_location(run_uri, cfg.storage),
    )
    cfg.ray.num_workers, cfg.ray.keep_checkpoints = 2, 6
    cfg.autoencoder.max_steps, cfg.autoencoder.decoder_steps = 2, 2
    cfg.autoencoder.gan_steps, cfg.autoencoder.gan_channels = 2, 8
    info = train_autoencoder(cfg, [f"s3://{bucket}/tiles"], run_uri)
    assert info["step"] == 6 and info["final_metrics"]["disc_loss"] > 0
    run = open_location(run_uri, cfg.storage)
    by_step = {}
    for d in {f.split("/")[0] for f in list_files(run) if f.startswith("checkpoint_") and "/" in f}:
        step = json.loads(read_bytes(run.join(d, "state.json")))["step"]
        by_step[step] = load_safetensors(read_bytes(run.join(d, "vae", "diffusion_pytorch_model.safetensors")))
    joint, decoder_only, adversarial = by_step[2], by_step[4], by_step[6]
    frozen = [k for k in joint if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in joint if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained
    assert all(torch.equal(joint[k], later[k]) for k in frozen for later in (decoder_only, adversarial))
    assert any(not torch.equal(joint[k], decoder_only[k]) for k in trained)
    assert any(not torch.equal(decoder_only[k], adversarial[k]) for k in trained)
    assert [r["step"] for r in csv_rows(run)] == [1, 2, 3, 4, 5, 6]
