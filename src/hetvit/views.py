"""Views of a batch of images for fitting: shifts, resized crops and CutMix boxes.

A fit sees each of its few thousand images many times, so every pass draws a fresh view of
each. The teacher labels each view itself, so a view need not keep its image's class, and no
label is mixed. Each function takes a generator and draws from nothing else, so a seeded fit is
reproducible; each is batched and costs nothing beside the model. :func:`hetvit.fitting.augment`
composes them as a :class:`~hetvit.fitting.FitConfig` asks.
"""

from __future__ import annotations

import math

import torch

__all__ = ["translate", "resized_crop", "cut_and_paste"]


def translate(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Each image shifted by its own random offset of up to ``pixels`` (reflect padding)."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pixels,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * pixels + 1, (x.shape[0], 2), generator=gen).tolist()
    return torch.stack([padded[k, :, i:i + h, j:j + w] for k, (i, j) in enumerate(offsets)])


def resized_crop(x: torch.Tensor, min_area: float, gen: torch.Generator) -> torch.Tensor:
    """Each image's own random box (area fraction in ``[min_area, 1]``, aspect ratio in
    ``[3/4, 4/3]`` as far as the box stays inside the image), resampled bilinearly to the full
    size.

    One batched ``grid_sample`` of per-image affine grids, so it costs nothing beside the model.
    """
    b = x.shape[0]
    area = min_area + (1 - min_area) * torch.rand(b, generator=gen)
    low = area.log().clamp(min=math.log(3 / 4))  # width and height both at most 1
    high = (-area.log()).clamp(max=math.log(4 / 3))
    aspect = torch.exp(low + (high - low) * torch.rand(b, generator=gen))
    width, height = (area * aspect).sqrt(), (area / aspect).sqrt()  # fractions of the image
    centre = (2 * torch.rand(b, 2, generator=gen) - 1) * torch.stack([1 - width, 1 - height], 1)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = width, height, centre
    grid = torch.nn.functional.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)


def cut_and_paste(x: torch.Tensor, other: torch.Tensor, lam: float, gen: torch.Generator
                  ) -> torch.Tensor:
    """CutMix: a box covering about ``1 - lam`` of the image, taken from ``other``."""
    h, w = x.shape[-2:]
    bh, bw = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
    i = int(torch.randint(0, h - bh + 1, (1,), generator=gen))
    j = int(torch.randint(0, w - bw + 1, (1,), generator=gen))
    out = x.clone()
    out[..., i:i + bh, j:j + bw] = other[..., i:i + bh, j:j + bw]
    return out
