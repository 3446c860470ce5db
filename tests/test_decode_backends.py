"""Each video backend decodes the right frames: a real H.264 mp4 (PyAV writes it, with B-frames and a
short GOP so that exact seeking matters) whose frame ``i`` carries ``i`` in binary as eight black or
white blocks over a textured background; every backend (torchcodec, decord, PyAV) must return, at
each requested index, the frame that carries that number, with the same frame count and rate, the
same full-size pixels as the others, and after the resize the same pixels as the others (torchcodec
and PyAV share the uint8 kernel: equal; decord scales in swscale: a small tolerance). The processor
(model room) and the data room's decoder give equal pixels for every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.inference_helpers import tiny_tokenizer
from videoflash.data.decode import MediaError, VideoDecoder
from videoflash.data.pipeline import LoaderConfig
from videoflash.data.sampling import frame_indices
from videoflash.model.processing_videoflash import VideoFlashProcessor
from videoflash.model.video_io import resize_uint8, resolve_backend, torchcodec_problem

W, H, N, FPS = 160, 96, 100, 25
BITS = 8  # frame numbers up to 255
BACKENDS = ["torchcodec", "decord", "pyav"]


def _needs(backend):
    if backend == "torchcodec" and torchcodec_problem() is not None:
        pytest.skip(torchcodec_problem())


def painted_frame(i: int) -> np.ndarray:
    """Frame ``i``: the top half is eight 20-px blocks, white where bit ``k`` of ``i`` is set; the
    bottom half a diagonal texture that moves with ``i`` (real detail for the decoders to differ on)."""
    arr = np.zeros((H, W, 3), np.uint8)
    yy, xx = np.mgrid[0 : H // 2, 0:W]
    arr[H // 2 :] = ((xx * 7 + yy * 5 + 3 * i) % 200 + 28).astype(np.uint8)[..., None]
    bw = W // BITS
    for k in range(BITS):
        arr[: H // 2, k * bw : (k + 1) * bw] = 235 if (i >> k) & 1 else 20
    return arr


def read_number(frame: torch.Tensor) -> int:
    """The number a decoded frame (any size) carries: the mean of the middle of each block."""
    f = frame.float().mean(-1)
    h, w = f.shape
    bw = w / BITS
    n = 0
    for k in range(BITS):
        x0, x1 = int(k * bw + bw / 4), int(k * bw + 3 * bw / 4)
        if f[h // 8 : 3 * h // 8, x0 : max(x1, x0 + 1)].mean() > 128:
            n |= 1 << k
    return n


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> bytes:
    import av

    path = tmp_path_factory.mktemp("backends") / "numbered.mp4"
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"crf": "18", "g": "12", "bf": "3"}
        for i in range(N):
            for p in s.encode(av.VideoFrame.from_ndarray(painted_frame(i), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


# unsorted, with repeats, across GOPs, the last frame included
INDICES = [0, 1, 13, 12, 11, 50, 99, 99, 37, 36, 2, 75]


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_decodes_the_right_frames(mp4, backend):
    _needs(backend)
    dec = VideoDecoder(mp4, size=None, backend=backend)
    assert dec.backend == backend
    assert (dec.num_frames, dec.fps) == (N, float(FPS))
    full = dec.frames(INDICES)
    assert tuple(full.shape) == (len(INDICES), H, W, 3) and full.dtype == torch.uint8
    assert [read_number(f) for f in full] == INDICES
    small = VideoDecoder(mp4, size=64, backend=backend).frames(INDICES)
    assert tuple(small.shape) == (len(INDICES), 64, 64, 3)
    assert [read_number(f) for f in small] == INDICES
    # every frame, in one call: the number is the position
    every = VideoDecoder(mp4, size=64, backend=backend).frames(range(N))
    assert [read_number(f) for f in every] == list(range(N))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_decode_into_a_given_tensor(mp4, backend):
    # into a caller's tensor (the loader's shared area), for sorted, repeated and unsorted indices:
    # the frames that carry those numbers, equal to a plain decode's pixels, in that very tensor
    _needs(backend)
    dec = VideoDecoder(mp4, size=64, backend=backend)
    for idx in (list(range(0, N, 3)), [0, 5, 5, 9, 9, 9], [40, 2, 17]):
        out = torch.full((len(idx), 64, 64, 3), 7, dtype=torch.uint8)
        got = dec.frames(idx, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert [read_number(f) for f in out] == idx
        assert torch.equal(out, dec.frames(idx))
    with pytest.raises(ValueError, match="out must be"):
        dec.frames([1, 2], out=torch.empty((3, 64, 64, 3), dtype=torch.uint8))


def test_backends_agree_on_pixels_and_frame_picks(mp4):
    for b in BACKENDS:
        _needs(b)
    decs = {b: VideoDecoder(mp4, size=None, backend=b) for b in BACKENDS}
    picks = {b: frame_indices(d.num_frames, d.fps, "dynamic_fps1", 4, 64) for b, d in decs.items()}
    assert picks["decord"] == picks["torchcodec"] == picks["pyav"]
    full = {b: d.frames(INDICES) for b, d in decs.items()}
    # one H.264 bitstream, one yuv420p->RGB conversion: bit-identical full-size frames
    assert torch.equal(full["torchcodec"], full["decord"])
    assert torch.equal(full["torchcodec"], full["pyav"])
    small = {b: VideoDecoder(mp4, size=64, backend=b).frames(INDICES) for b in BACKENDS}
    assert torch.equal(small["torchcodec"], small["pyav"])  # same frames, same uint8 kernel
    assert torch.equal(small["torchcodec"], resize_uint8(full["torchcodec"], 64, 64))
    diff = (small["torchcodec"].int() - small["decord"].int()).abs().float()
    assert diff.mean() < 3.0, diff.mean()  # swscale's bicubic against torch's: close, not equal


def test_resize_uint8_matches_the_float_bicubic():
    from videoflash.model.anyres import resize_frames

    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 90, 130, 3), generator=g, dtype=torch.uint8)
    frames[:, 40:] = 200  # flat areas and noise
    got, ref = resize_uint8(frames, 64, 48), resize_frames(frames, 64, 48)
    assert got.shape == ref.shape == (3, 64, 48, 3)
    d = (got.int() - ref.int()).abs()
    assert d.max() <= 1 and d.float().mean() < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_processor_and_data_room_decode_alike(mp4, backend):
    _needs(backend)
    proc = VideoFlashProcessor(tiny_tokenizer(), image_size=64, tokens_per_frame=4, tokens_per_image=16,
                               min_frames=8, max_frames=24, max_grid=2, video_backend=backend)  # fmt: skip
    frames, meta = proc.load_video(mp4)
    assert [read_number(f) for f in frames] == meta.indices
    ref = VideoDecoder(mp4, size=64, backend=backend).frames(meta.indices)
    assert torch.equal(frames, ref)


def test_auto_backend_and_bad_names(mp4):
    assert resolve_backend("auto") == ("torchcodec" if torchcodec_problem() is None else "decord")
    assert VideoDecoder(mp4, size=64).backend == resolve_backend("auto")
    with pytest.raises(ValueError, match="opencv"):
        VideoDecoder(mp4, size=64, backend="opencv")
    with pytest.raises(ValueError, match="LoaderConfig.video_backend"):
        LoaderConfig(sources=["x"], video_backend="opencv").validate()
    with pytest.raises(ValueError, match="video_backend"):
        VideoFlashProcessor(tiny_tokenizer(), video_backend="opencv")
    for b in BACKENDS:
        if b == "torchcodec" and torchcodec_problem() is not None:
            continue
        with pytest.raises(MediaError) as err:
            VideoDecoder(mp4[: len(mp4) // 3] + b"\0" * 64, size=64, backend=b).frames(range(N))
        assert err.value.reason == "bad_video"
