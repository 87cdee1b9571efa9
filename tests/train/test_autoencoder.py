"""The autoencoder stage on the S3 server: the decoder phases move the decoder alone, so the latents
stay as they were."""

import json

import torch
from safetensors.torch import load as load_safetensors

from histodiff_ray.storage import list_files, open_location, read_bytes
from tests.train.conftest import csv_rows


def test_decoder_phases_train_the_decoder_alone_so_the_latents_do_not_change(latents):
    # The session's autoencoder (tests/conftest.py) ran 2 joint steps, 2 of the decoder alone and 2
    # adversarial ones (decoder and discriminator in one backward) on two DDP workers, keeping the
    # checkpoint at the end of each phase.
    cfg, bucket = latents
    run = open_location(f"s3://{bucket}/runs/ae", cfg.storage)
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
    rows = csv_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["disc_loss"] > 0 for r in rows[4:]) and all(r["disc_loss"] is None for r in rows[:4])
