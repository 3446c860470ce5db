"""anyres tiling: hand-worked grid choices, tile layout, and the resize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from videoflash.model.anyres import resize_square, select_best_grid, tile_image


# Grids are (gh, gw). Every case is worked out by hand in its comment. "full" = height*width:
# the effective resolution can never exceed it, and reaches it exactly when the canvas holds the
# whole image at scale >= 1 (both canvas sides >= the image's).
@pytest.mark.parametrize(
    "height,width,tile,want",
    [
        # 448x448, tile 448: canvas 1x1 holds it at scale 1 -> full, waste 0. Nothing beats waste 0.
        (448, 448, 448, (1, 1)),
        # 448x448, tile 224: full needs gw, gh >= 2; the smallest such canvas is 2x2 (448x448), waste 0.
        (448, 448, 224, (2, 2)),
        # wide 448 high x 1344 wide, tile 448: canvas gw=3, gh=1 is exactly 1344x448 -> full, waste 0.
        (448, 1344, 448, (1, 3)),
        # tall 1344 x 448: the transpose, gw=1, gh=3.
        (1344, 448, 448, (3, 1)),
        # tiny 10x20, tile 224: every canvas holds it (scale > 1) -> all full (200); the least waste
        # is the smallest canvas, 1x1.
        (10, 20, 224, (1, 1)),
        # 600 high x 800 wide, tile 224: full needs gw*224 >= 800 (gw >= 4) and gh*224 >= 600
        # (gh >= 3); the least waste among those is gw=4, gh=3 (896x672, waste 602112-480000).
        (600, 800, 224, (3, 4)),
        # larger than the largest canvas: 2016 high x 2688 wide, tile 224 (canvases up to 1344).
        # gw=6: 1344/2688 = .5. With gh=5 (1120/2016 = .556) or gh=6 (.667), scale = .5 ->
        # 1344x1008 = 1354752 kept, the most any canvas keeps (gw<6 gives scale <= 1120/2688 and
        # gh<=4 gives scale <= 896/2016 = .444 < .5). Waste: gh=5 -> 1344*1120-1354752 = 150528,
        # gh=6 -> 451584. So gh=5, gw=6.
        (2016, 2688, 224, (5, 6)),
        # very wide 100 x 5000, tile 224: scale is set by the width: gw=6 -> 1344/5000 = .2688,
        # down 1344 x int(26.88)=26 = 34944 (gh=1 already allows 224/100 > .2688), the max.
        # Least waste: gh=1 -> canvas 1344x224.
        (100, 5000, 224, (1, 6)),
    ],
)
def test_select_best_grid_hand_worked(height, width, tile, want):
    assert select_best_grid(height, width, tile) == want


def test_select_best_grid_max_grid():
    # With max_grid=2 the 2016x2688 image can use at most 448x448: gw=2 scale .1667 (448/2688),
    # gh=2 scale .222 -> scale .1667 -> 448 x 336, gh=2 wastes 448*448-150528 = 50176, gh=1
    # (224/2016 = .111) keeps less. So (2, 2).
    assert select_best_grid(2016, 2688, 224, max_grid=2) == (2, 2)
    # max_grid=1 leaves only the 1x1 canvas
    assert select_best_grid(5000, 100, 224, max_grid=1) == (1, 1)


def _reference_resize(img_uint8_hwc: torch.Tensor, h: int, w: int) -> torch.Tensor:
    x = img_uint8_hwc.permute(2, 0, 1)[None].double()
    y = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)


def test_tiles_reassemble_to_resized_image():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (37, 53, 3), dtype=torch.uint8, generator=g)
    tile, (gh, gw) = 16, (2, 3)
    tiles = tile_image(image, tile, (gh, gw))
    assert tiles.shape == (1 + gh * gw, tile, tile, 3) and tiles.dtype == torch.uint8
    # reassemble: tile k sits at row k // gw, column k % gw (raster order)
    canvas = torch.zeros(gh * tile, gw * tile, 3, dtype=torch.uint8)
    for k in range(gh * gw):
        r, c = divmod(k, gw)
        canvas[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = tiles[1 + k]
    # float64 reference vs float32 code: allow a rounding step at x.5 boundaries
    assert (canvas.int() - _reference_resize(image, gh * tile, gw * tile).int()).abs().max() <= 1
    assert (tiles[0].int() - _reference_resize(image, tile, tile).int()).abs().max() <= 1


def test_tile_raster_order_hand_worked():
    # An image exactly 2 tiles high and 3 wide (no resize), each tile region a constant colour
    # equal to its raster index: tiles 1..6 must be constant 0..5 in that order.
    tile = 4
    image = torch.zeros(2 * tile, 3 * tile, 3, dtype=torch.uint8)
    for r in range(2):
        for c in range(3):
            image[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = 10 * (r * 3 + c)
    tiles = tile_image(image, tile, (2, 3))
    for k in range(6):
        assert (tiles[1 + k] == 10 * k).all(), k


def test_resize_square_properties():
    # a constant image stays constant at any size (the bicubic weights sum to 1)
    frames = torch.full((3, 30, 50, 3), 77, dtype=torch.uint8)
    out = resize_square(frames, 24)
    assert out.shape == (3, 24, 24, 3) and out.dtype == torch.uint8 and (out == 77).all()
    # same size: unchanged
    rnd = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    assert torch.equal(resize_square(rnd, 8), rnd)
    # empty batches are fine (the collator may have no frames)
    assert resize_square(torch.zeros(0, 10, 10, 3, dtype=torch.uint8), 6).shape == (0, 6, 6, 3)
    # bicubic overshoots at a sharp 0/255 edge; it is clamped, not wrapped around by the uint8 cast
    edge = torch.zeros(1, 16, 16, 3, dtype=torch.uint8)
    edge[:, :, 8:] = 255
    big = resize_square(edge, 40)
    assert big[:, :, :18].max() < 40 and big[:, :, 22:].min() > 215


def test_resize_square_matches_reference_on_many_frames():
    # more frames than one internal chunk
    frames = torch.randint(0, 256, (20, 12, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = resize_square(frames, 9)
    want = torch.stack([_reference_resize(f, 9, 9) for f in frames])
    assert (out.int() - want.int()).abs().max() <= 1


def test_thumbnail_first_and_count():
    image = torch.randint(0, 256, (100, 300, 3), dtype=torch.uint8)
    # 100 high x 300 wide, tile 50: full needs gw >= 6 (300) and gh >= 2 (100) -> (2, 6), waste 0.
    grid = select_best_grid(100, 300, 50)
    assert grid == (2, 6)
    tiles = tile_image(image, 50, grid)
    assert tiles.shape == (13, 50, 50, 3)
    assert torch.equal(tiles[0], resize_square(image[None], 50)[0])
    # the canvas equals the image size here, so the tiles are the image itself
    assert torch.equal(tiles[1], image[:50, :50]) and torch.equal(tiles[12], image[50:, 250:])


def test_bad_inputs():
    with pytest.raises(ValueError):
        select_best_grid(0, 10, 224)
    with pytest.raises(ValueError):
        tile_image(torch.zeros(10, 10, dtype=torch.uint8), 4, (1, 1))
    with pytest.raises(ValueError):
        resize_square(torch.zeros(1, 10, 10, 3), 4)  # float frames
