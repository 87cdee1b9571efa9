"""The latent UNet's class embedding for classifier-free guidance."""

import torch

from histodiff_ray.config import load_config
from histodiff_ray.models.unet import build_unet, null_class


def test_a_class_conditional_unet_has_a_null_class_and_takes_pretrained_unconditional_weights():
    cfg = load_config("cpu", ["unet.base_channels=32"])
    plain = build_unet(cfg.unet, 16, 4)
    conditional = build_unet(cfg.unet, 16, 4, num_classes=5)
    assert null_class(plain) is None and null_class(conditional) == 5
    missing, unexpected = conditional.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["class_embedding.weight"] and not unexpected
    torch.nn.init.zeros_(conditional.class_embedding.weight)
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():  # a zero class embedding is the unconditional model, whatever the class
        torch.testing.assert_close(conditional(z, t, class_labels=torch.tensor([0, 5])).sample, plain(z, t).sample)
