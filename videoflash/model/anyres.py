"""High-resolution image tiling ("anyres_nopad", VideoChat-Flash section 1.4).

In stages 2-4 a single image is shown to the model as a global thumbnail plus a grid of tiles:

- the grid is chosen among the canvases ``gw*tile`` wide and ``gh*tile`` high, ``1 <= gw, gh <= 6``
  (``image_grid_pinpoints = (1x1),...,(6x6)``), by LLaVA's best-resolution rule: keep as many of the
  image's pixels as possible once it is scaled to fit the canvas, then waste as little canvas as
  possible;
- the image is *resized* (not padded: aspect ratio may change a little) to exactly the canvas and cut
  into ``gh*gw`` tiles in raster order; the thumbnail is the whole image resized to one square tile;
- every tile goes through the encoder as a one-frame input and is merged to 64 tokens, so an image
  costs at most (1 + 36) * 64 = 2368 tokens.

These are pure functions shared by the data room (which cuts the tiles) and the model room (which
must agree on the geometry); this file imports only torch.

Resizing everywhere (tiles, thumbnails, square frames) is the same: bicubic with antialias on float,
then rounded and clamped back to uint8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["select_best_grid", "tile_image", "resize_square", "resize_frames"]

#: frames resized per call of F.interpolate (bounds the float32 working memory)
_RESIZE_CHUNK = 16


def select_best_grid(height: int, width: int, tile: int, max_grid: int = 6,
                     candidates: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """The ``(grid_h, grid_w)`` of tiles for an image of ``height x width`` pixels.

    Candidate canvases are ``(gw*tile) x (gh*tile)`` for ``gw, gh`` in ``1..max_grid``, enumerated
    with ``gw`` in the outer loop and ``gh`` in the inner one, or the ``(gh, gw)`` grids of
    ``candidates`` in their order (a release's ``image_grid_pinpoints``). For each, the image is scaled by
    ``min(canvas_w / width, canvas_h / height)``; ``effective = min(int(width*s) * int(height*s),
    width*height)`` and ``waste = canvas area - effective``. The canvas with the largest effective
    resolution wins; ties go to the smallest waste, then to the first enumerated.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if tile < 1 or max_grid < 1:
        raise ValueError(f"tile ({tile}) and max_grid ({max_grid}) must be >= 1")
    best: tuple[int, int] | None = None
    best_effective, best_waste = -1, None
    if candidates is None:
        candidates = [(gh, gw) for gw in range(1, max_grid + 1) for gh in range(1, max_grid + 1)]
    for gh, gw in candidates:
        if gh < 1 or gw < 1:
            raise ValueError(f"a candidate grid must be at least (1, 1), got {(gh, gw)}")
        canvas_w, canvas_h = gw * tile, gh * tile
        scale = min(canvas_w / width, canvas_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        waste = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (gh, gw), effective, waste
    if best is None:
        raise ValueError("no candidate grid")
    return best


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize uint8 ``[N, H, W, 3]`` frames to uint8 ``[N, height, width, 3]``.

    Bicubic with antialias (align_corners=False) on float, rounded and clamped to 0..255. Frames
    already at the size are returned as they are.
    """
    frames = torch.as_tensor(frames)
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [N, H, W, 3], got {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    n, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    if n == 0:
        return frames.new_empty((0, height, width, 3))
    out = []
    for chunk in frames.split(_RESIZE_CHUNK):
        x = chunk.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out).contiguous()


def resize_square(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 ``[N, H, W, 3]`` frames to a ``size x size`` square (no crop, no pad)."""
    return resize_frames(frames, size, size)


def tile_image(image: torch.Tensor, tile: int, grid: tuple[int, int]) -> torch.Tensor:
    """Cut an image into its thumbnail and grid tiles.

    Args:
        image: uint8 ``[H, W, 3]``.
        tile: tile side in pixels (the encoder's input size).
        grid: ``(gh, gw)``, e.g. from :func:`select_best_grid`.

    Returns:
        uint8 ``[1 + gh*gw, tile, tile, 3]``: the whole image resized to ``tile x tile`` first, then
        the image resized to ``(gh*tile) x (gw*tile)`` and cut into tiles row by row.
    """
    image = torch.as_tensor(image)
    if image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W, 3], got {tuple(image.shape)}")
    gh, gw = (int(g) for g in grid)
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must be at least (1, 1), got {tuple(grid)}")
    thumb = resize_frames(image[None], tile, tile)
    big = resize_frames(image[None], gh * tile, gw * tile)[0]  # [gh*tile, gw*tile, 3]
    tiles = big.reshape(gh, tile, gw, tile, 3).permute(0, 2, 1, 3, 4).reshape(gh * gw, tile, tile, 3)
    return torch.cat([thumb, tiles]).contiguous()
