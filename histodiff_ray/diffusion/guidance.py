"""Guidance for ``ddim_sample``: classifier guidance (Dhariwal & Nichol 2021) as a ``cond_fn``, the
gradient ∇_z log p(y | z_t, t) of a noise-aware classifier; and classifier-free guidance (Ho &
Salimans 2022) as the ε-model itself."""

from __future__ import annotations

from collections.abc import Callable

import torch

CondFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_cond_fn(
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], labels: torch.Tensor
) -> CondFn:
    """``cond_fn(z, t) = ∇_z log softmax(classifier(z, t))[y]`` for each sample's own label.

    ``labels`` holds one class per sample (or one for all). The per-sample log-probabilities are
    summed before differentiating, which gives every sample the gradient of its own term as long as
    the classifier treats samples independently (GroupNorm, no batch statistics). The result has z's
    shape and dtype and keeps no graph; neither the classifier's parameters nor their ``.grad`` are
    touched. The classifier's train/eval mode is the caller's choice.
    """

    def cond_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z_in = z.detach().requires_grad_(True)
            y = torch.as_tensor(labels, device=z.device).long().expand(z.shape[0])
            log_probs = torch.log_softmax(classifier(z_in, t).float(), dim=-1)
            selected = log_probs[torch.arange(z.shape[0], device=z.device), y]
            (grad,) = torch.autograd.grad(selected.sum(), z_in)
        return grad.detach()

    return cond_fn


def classifier_free_eps(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    null_label: int,
    scale: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The guided ε-model ε̂(z, t) = ε(z, t, ∅) + w · (ε(z, t, y) − ε(z, t, ∅)) for ``model(z, t, y)``.

    w = 0 is the unconditional model, w = 1 the conditional one, w > 1 pushes further toward the
    class. Both branches run as one batch of twice the size (one UNet call per step).
    """

    def eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = torch.as_tensor(labels, device=z.device).long().expand(z.shape[0])
        null = torch.full_like(y, null_label)
        conditional, unconditional = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return eps
