"""The VideoFlash processor: a video (or image) and a question -> the model's input dict.

It carries the tokenizer (with its ChatML chat template) and the frame policy the model was trained
with, so that an exported checkpoint samples, sizes and prompts exactly as training did:

- **frames**: the policy of :mod:`frame_sampling` (``dynamic_fps1``: about 1 fps, a multiple of
  4, clamped to ``[min_frames, max_frames]``; ``middle``; ``fps:<rate>``), indices picked by
  "middle" uniform sampling, optionally within a ``start``/``end`` span;
- **decoding** (``video_backend``, :mod:`video_io`): torchcodec decodes full-size frames and torch's
  uint8 bicubic resizes them to ``image_size x image_size`` (a square: no crop, no pad), or, where
  torchcodec cannot load (``auto``) or when asked (``decord``), decord's filter graph scales each
  frame while decoding; the data room decodes training samples the same way. Frames leave as uint8
  ``[N, S, S, 3]``. Normalisation (``image_mean``/``image_std``, recorded here and in the model
  config) happens on the model's device;
- **prompt**: VideoChat-Flash's layout (reference videochat_flash.md §3.4): the first user turn is
  ``"<image>\\n" + time message + " " + question`` where the time message is "The video lasts for
  X.XX seconds, and N frames are uniformly sampled from it."; later turns are plain text; the
  tokenizer's chat template renders the conversation and opens the assistant turn;
- **output**: ``input_ids``, ``attention_mask``, ``pixel_values_videos`` (uint8),
  ``video_frame_counts`` -- or, for images, ``pixel_values_images``, ``image_tile_counts``,
  ``image_grids`` (docs/contracts.md §1).

**Reference rules** (the converter turns them on for a released VideoChat-Flash checkpoint, so it
sees what the original ``chat()`` shows it; docs/model.md lists which are defaults):

- ``frame_rules="videochat_flash"``: the release's ``read_frames_decord``: ``min_frames`` wins over a
  smaller ``max_frames``; a ``start``/``end`` span keeps ``start = max(0, start)``, clamps ``end`` to
  ``duration - 0.1``, takes ``duration = end - start``, ``int(duration * fps)`` frames from
  ``int(start * fps)`` on (videoflash's own rule rounds both ends and lowers the min to the max);
- ``resize="exact"``: decode at the file's full size, then the bicubic resize of :mod:`anyres` (the
  release resizes full frames); ``"decode"`` lets decord scale while it decodes (faster; what
  training uses: docs/model.md gives the measured difference);
- ``multi_image="pad"``: several images are each padded to a square with the mean colour
  (``int(255 * image_mean)``, the image centred), then resized, as LLaVA's ``expand2square``;
  ``"squash"`` resizes them as they are;
- ``grid_pinpoints``: the release's ``image_grid_pinpoints`` (``[width, height]`` canvases in
  pixels, each a multiple of the tile) replace the ``1..max_grid`` square of candidate grids.

Long videos need not be decoded at once: :meth:`VideoFlashProcessor.open_video` +
:meth:`VideoFlashProcessor.iter_video_batches` yield the sampled frames in bounded batches, which
``VideoFlashForConditionalGeneration.encode_video_chunked`` turns into visual tokens batch by batch.

This file is copied into every exported checkpoint (``AutoProcessor.from_pretrained(dir,
trust_remote_code=True)``): it imports only torch, numpy, transformers, the standard library and its
siblings; decord (and Pillow, for image files) are imported when first needed.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .anyres import resize_frames, resize_square, select_best_grid, tile_image
from .frame_sampling import frame_count, frame_indices, middle_indices, parse_policy
from .video_io import BACKENDS, FrameReader, resize_uint8, resolve_backend

__all__ = [
    "VideoFlashProcessor",
    "VideoSource",
    "VideoMeta",
    "time_message",
    "reference_span",
    "expand_to_square",
    "CHATML_TEMPLATE",
    "IMAGE_TOKEN",
]

IMAGE_TOKEN = "<image>"
_EXACT_CHUNK = 16  # full-size frames decoded per call on the exact path
FRAME_RULES = ("videoflash", "videochat_flash")
RESIZES = ("decode", "exact")
MULTI_IMAGE = ("squash", "pad")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Qwen2-Instruct ChatML, used only when the tokenizer carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def time_message(duration: float, num_frames: int) -> str:
    """VideoChat-Flash's ``time_msg="short"`` sentence (without the surrounding whitespace)."""
    return f"The video lasts for {float(duration):.2f} seconds, and {int(num_frames)} frames are uniformly sampled from it."


def reference_span(num_frames: int, fps: float, start: float | None, end: float | None) -> tuple[int, int, float]:
    """VideoChat-Flash's clip rule -> ``(first frame, frame count, duration in seconds)``.

    ``start = max(0, start)``, ``end = min(duration - 0.1, end)`` (a missing one is 0 / the video's
    duration), ``duration = end - start``, ``int(duration * fps)`` frames from ``int(start * fps)``."""
    if not fps or not fps > 0:
        raise ValueError(f"a start/end span needs a positive fps, got {fps!r}")
    total = num_frames / float(fps)
    lo = max(0.0, float(start) if start is not None else 0.0)
    hi = min(total - 0.1, float(end) if end is not None else total)
    duration = hi - lo
    vlen = int(duration * fps)
    if vlen < 1:
        raise ValueError(f"empty span: start={start} end={end} of a {total:.2f} s video")
    return int(lo * fps), vlen, duration


def expand_to_square(image: torch.Tensor, fill) -> torch.Tensor:
    """Pad a uint8 ``[H, W, 3]`` image to a square of side ``max(H, W)`` with the colour ``fill``,
    the image centred (offset ``(side - short) // 2``), as LLaVA's ``expand2square``."""
    h, w = int(image.shape[0]), int(image.shape[1])
    if h == w:
        return image
    side = max(h, w)
    out = torch.tensor(list(fill), dtype=torch.uint8).expand(side, side, 3).clone()
    top, left = (side - h) // 2, (side - w) // 2
    out[top: top + h, left: left + w] = image
    return out


# --------------------------------------------------------------------------------------------------
# video sources
# --------------------------------------------------------------------------------------------------


@dataclass
class VideoMeta:
    """What sampling decided for one video: the frame indices, the source's frame count and rate,
    the duration of the sampled span (seconds) and the time message built from them."""

    indices: list[int]
    num_frames: int
    fps: float
    duration: float
    time_message: str = field(default="")

    @property
    def num_sampled(self) -> int:
        return len(self.indices)


def _decord():
    try:
        import decord
    except ImportError as exn:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading video files needs decord (pip install decord2, or decord on older Pythons)"
        ) from exn
    return decord


class VideoSource:
    """One video, ready to decode frames at ``size x size`` uint8.

    ``video`` is a file path, the file's bytes, or already decoded frames (uint8 ``[N, H, W, 3]``,
    numpy or torch; ``fps`` gives their rate, 1.0 when not given). Files are read by decord, which
    scales every decoded frame to the target size in its own filter graph. Some output widths make
    decord 3.4 fail (e.g. 32, 48, 96, 144 px); the source then decodes at the next multiple of 64 and
    resizes the frames it keeps with the bicubic resize of :mod:`anyres` (the data room does the same).
    ``exact=True`` decodes at the file's own size and resizes with that bicubic (the release's path).
    ``backend`` (:data:`video_io.BACKENDS`): with ``torchcodec`` or ``pyav`` (``auto`` picks
    torchcodec when it loads) the file is decoded at full size, 16 frames at a time, and resized with
    the uint8 bicubic of :func:`video_io.resize_uint8` (``exact``: the float one of :mod:`anyres`).
    """

    def __init__(self, video, size: int, fps: float | None = None, num_threads: int = 1, exact: bool = False,
                 backend: str = "auto"):  # fmt: skip
        self.size = int(size)
        self.exact = bool(exact)
        self.backend = backend  # resolved ("auto" -> a library) once the video is known to be a file
        self._frames = None
        self._reader = self._full = None
        self._data = None
        self._num_threads = int(num_threads)
        if isinstance(video, (np.ndarray, torch.Tensor)):
            frames = torch.as_tensor(video)
            if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
                raise ValueError(f"decoded frames must be uint8 [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
            if frames.shape[0] < 1:
                raise ValueError("the video holds no frames")
            self._frames = frames
            self.num_frames = int(frames.shape[0])
            self.fps = float(fps) if fps else 1.0
            return
        if isinstance(video, (bytes, bytearray, memoryview)):
            self._data = bytes(video)
            if not self._data:
                raise ValueError("the video has zero bytes")
            self.name = "<bytes>"
        elif isinstance(video, (str, os.PathLike)):
            path = os.fspath(video)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no such video file: {path}")
            self._data = path
            self.name = path
        else:
            raise TypeError(f"a video is a path, bytes or uint8 frames [N, H, W, 3]; got {type(video).__name__}")
        self.backend = resolve_backend(backend)
        if self.backend != "decord":
            try:
                self._full = FrameReader(self._data, self.backend, self._num_threads)
            except Exception as exn:  # noqa: BLE001 - each library raises its own errors
                raise ValueError(f"cannot open the video {self.name}: {str(exn).splitlines()[0][:200] if str(exn) else exn!r}") from exn
            self.num_frames, native_fps = self._full.num_frames, self._full.fps
        else:
            self._decode_width = None if self.exact else self.size
            self._open(self._decode_width)
            self.num_frames, native_fps = len(self._reader), float(self._reader.get_avg_fps())
        self.fps = float(fps) if fps else float(native_fps)
        if self.num_frames < 1 or not self.fps > 0:
            raise ValueError(f"{self.name}: {self.backend} reports {self.num_frames} frames at {self.fps} fps")

    def _open(self, width: int | None) -> None:
        """Open the reader scaling to ``width x size`` while decoding, or at full size (``None``)."""
        decord = _decord()
        src = io.BytesIO(self._data) if isinstance(self._data, bytes) else self._data
        size = {} if width is None else {"width": int(width), "height": self.size}
        try:
            self._reader = decord.VideoReader(src, num_threads=self._num_threads, **size)
        except Exception as exn:  # decord raises DECORDError / RuntimeError
            raise ValueError(f"cannot open the video {getattr(self, 'name', '')}: {str(exn).splitlines()[0][:200]}") from exn
        self._decode_width = None if width is None else int(width)

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def _read(self, uniq: list[int]) -> torch.Tensor:
        try:
            arr = self._reader.get_batch(uniq).asnumpy()
            if self._decode_width is None:
                ok = arr.ndim == 4 and arr.shape[0] == len(uniq) and arr.shape[-1] == 3
            else:
                ok = arr.shape == (len(uniq), self.size, self._decode_width, 3)
        except Exception as exn:  # noqa: BLE001 - decord's errors have no common base class
            err, ok = exn, False
        else:
            err = None
        finally:
            try:
                self._reader.seek(0)
            except Exception:  # noqa: BLE001
                pass
        if ok:
            return torch.from_numpy(np.ascontiguousarray(arr))
        fallback = (self.size // 64 + 1) * 64
        if self._decode_width is None or self._decode_width == fallback:
            raise ValueError(f"cannot decode frames of {self.name}: {err}")
        self._open(fallback)  # a width decord handles; the frames are resized to the square below
        return self._read(uniq)

    def frames(self, indices) -> torch.Tensor:
        """Decode the frames at ``indices`` (repeats allowed) -> uint8 ``[n, size, size, 3]``."""
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("no frame indices")
        if min(indices) < 0 or max(indices) >= self.num_frames:
            raise ValueError(f"frame index out of range for a {self.num_frames}-frame video")
        if self._frames is not None:
            return resize_square(self._frames[indices], self.size).contiguous()
        uniq = sorted(set(indices))
        pos = {f: k for k, f in enumerate(uniq)}
        if self._full is not None:
            try:
                got = self._full.read_resized(uniq, self.size, self.size, resize_frames if self.exact else resize_uint8)
            except Exception as exn:  # noqa: BLE001
                raise ValueError(f"cannot decode frames of {self.name}: {exn}") from exn
            return got[[pos[i] for i in indices]].contiguous()
        # full-size frames (exact) are resized a few at a time, so that 512 frames of 1080p never
        # exist decoded at once
        step = _EXACT_CHUNK if self._decode_width is None else len(uniq)
        parts = []
        for lo in range(0, len(uniq), step):
            got = self._read(uniq[lo : lo + step])
            if got.shape[1] != self.size or got.shape[2] != self.size:
                got = resize_frames(got, self.size, self.size)
            parts.append(got)
        got = torch.cat(parts) if len(parts) > 1 else parts[0]
        return got[[pos[i] for i in indices]].contiguous()

    def close(self) -> None:
        self._reader = None
        self._full = None
        self._frames = None


# --------------------------------------------------------------------------------------------------
# the processor
# --------------------------------------------------------------------------------------------------


class VideoFlashProcessor(ProcessorMixin):
    r"""Tokenizer + frame policy of a VideoFlash checkpoint.

    Args:
        tokenizer: a fast tokenizer whose vocabulary holds ``<image>`` (the placeholder) and whose chat
            template renders ChatML (``<|im_start|>`` / ``<|im_end|>``).
        chat_template: overrides the tokenizer's template (default: the tokenizer's, else ChatML).
        frame_policy: ``"dynamic_fps1"``, ``"middle"`` or ``"fps:<rate>"`` (see ``frame_sampling``).
        min_frames, max_frames: the policy's bounds (``frames_lowbound`` / ``frames_upbound``).
        frames_per_clip: frames per encoder clip; frame counts are multiples of it.
        image_size: side of the square frames and image tiles fed to the encoder.
        image_mean, image_std: the normalisation the model applies on its device (recorded here).
        tokens_per_frame, tokens_per_image: visual tokens per frame / per image tile after merging.
        max_grid: largest tile grid side for a high-resolution image (``image_mode="anyres"``).
        image_mode: ``"anyres"`` (thumbnail + grid tiles) or ``"square"`` for a single image.
        image_token: the placeholder string.
        add_time_message: put the duration/frame-count sentence after the placeholder (as training).
        system_prompt: a system turn to prepend (default: none, i.e. the template's default).
        decode_threads: the decoder's threads per video.
        video_backend: ``"auto"`` (torchcodec when it loads, else decord), ``"torchcodec"``, ``"decord"``
            or ``"pyav"`` (:mod:`video_io`); the data room's ``data.video_backend`` decodes alike.
        frame_rules: ``"videoflash"`` or ``"videochat_flash"`` (the release's span and min/max rules).
        resize: ``"decode"`` (decord scales while decoding; torchcodec/pyav: uint8 bicubic) or
            ``"exact"`` (full-size decode + the float bicubic of :mod:`anyres`).
        multi_image: ``"squash"`` or ``"pad"`` (several images padded to a square with the mean colour).
        grid_pinpoints: ``[[width, height], ...]`` canvases in pixels for ``anyres`` (None: the
            ``1..max_grid`` square of grids).
    """

    def __init__(
        self,
        tokenizer=None,
        chat_template=None,
        frame_policy: str = "dynamic_fps1",
        min_frames: int = 4,
        max_frames: int = 512,
        frames_per_clip: int = 4,
        image_size: int = 224,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        tokens_per_frame: int = 16,
        tokens_per_image: int = 64,
        max_grid: int = 6,
        image_mode: str = "anyres",
        image_token: str = IMAGE_TOKEN,
        add_time_message: bool = True,
        system_prompt: str | None = None,
        decode_threads: int = 1,
        video_backend: str = "auto",
        frame_rules: str = "videoflash",
        resize: str = "decode",
        multi_image: str = "squash",
        grid_pinpoints=None,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("VideoFlashProcessor needs a tokenizer")
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
        super().__init__(tokenizer, chat_template=chat_template)
        parse_policy(frame_policy)  # fails early on a bad policy name
        self.frame_policy = str(frame_policy)
        self.min_frames = int(min_frames)
        self.max_frames = int(max_frames)
        self.frames_per_clip = int(frames_per_clip)
        self.image_size = int(image_size)
        self.image_mean = [float(x) for x in image_mean]
        self.image_std = [float(x) for x in image_std]
        self.tokens_per_frame = int(tokens_per_frame)
        self.tokens_per_image = int(tokens_per_image)
        self.max_grid = int(max_grid)
        if image_mode not in ("anyres", "square"):
            raise ValueError(f"image_mode must be 'anyres' or 'square', got {image_mode!r}")
        self.image_mode = image_mode
        self.image_token = str(image_token)
        self.add_time_message = bool(add_time_message)
        self.system_prompt = system_prompt
        self.decode_threads = int(decode_threads)
        if video_backend not in BACKENDS:
            raise ValueError(f"video_backend must be one of {BACKENDS}, got {video_backend!r}")
        self.video_backend = str(video_backend)
        for name, value, choices in (("frame_rules", frame_rules, FRAME_RULES), ("resize", resize, RESIZES),
                                     ("multi_image", multi_image, MULTI_IMAGE)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        self.frame_rules, self.resize, self.multi_image = frame_rules, resize, multi_image
        self.grid_pinpoints = None if grid_pinpoints is None else [[int(w), int(h)] for w, h in grid_pinpoints]
        self._grids = None
        if self.grid_pinpoints is not None:
            bad = [wh for wh in self.grid_pinpoints if wh[0] % self.image_size or wh[1] % self.image_size or min(wh) < 1]
            if bad or not self.grid_pinpoints:
                raise ValueError(f"grid_pinpoints must be [width, height] multiples of the {self.image_size}px tile, "
                                 f"got {bad or self.grid_pinpoints}")
            self._grids = [(h // self.image_size, w // self.image_size) for w, h in self.grid_pinpoints]
        vocab = tokenizer.get_vocab()
        if self.image_token not in vocab:
            raise ValueError(f"the tokenizer has no {self.image_token!r} token; add it as a special token first")
        self.image_token_id = int(vocab[self.image_token])

    @classmethod
    def from_model_config(cls, tokenizer, config, **policy) -> "VideoFlashProcessor":
        """A processor whose geometry (size, normalisation, token counts, clip length, tile grid)
        comes from a ``VideoFlashConfig``; ``policy`` sets the frame policy and other fields."""
        geometry = dict(
            frames_per_clip=config.frames_per_clip,
            image_size=config.image_size,
            image_mean=config.image_mean,
            image_std=config.image_std,
            tokens_per_frame=config.tokens_per_frame,
            tokens_per_image=config.tokens_per_image,
            max_grid=config.max_grid,
        )
        geometry.update(policy)
        return cls(tokenizer, **geometry)

    @classmethod
    def from_directory(cls, path, config=None, **overrides) -> "VideoFlashProcessor":
        """Load from a checkpoint directory without the Auto classes: its tokenizer and, when present,
        its ``processor_config.json``; a directory without one (a training stage's export) gets the
        geometry from ``config`` (a ``VideoFlashConfig``) and the default frame policy. ``overrides``
        set processor fields. No remote code is run."""
        from transformers import AutoTokenizer

        path = os.fspath(path)
        tok_kwargs = {"config": config} if config is not None else {"trust_remote_code": False}
        tokenizer = AutoTokenizer.from_pretrained(path, **tok_kwargs)
        proc_file = os.path.join(path, "processor_config.json")
        if os.path.isfile(proc_file):
            with open(proc_file, encoding="utf-8") as f:
                fields = json.load(f)
            for key in ("auto_map", "processor_class"):
                fields.pop(key, None)
            fields.update(overrides)
            return cls(tokenizer, **fields)
        if config is None:
            raise ValueError(f"{path} has no processor_config.json; pass the model config to build a processor")
        return cls.from_model_config(tokenizer, config, **overrides)

    # -- videos ------------------------------------------------------------------------------------
    def open_video(self, video, fps: float | None = None) -> VideoSource:
        """A :class:`VideoSource` at this processor's frame size."""
        if isinstance(video, VideoSource):
            return video
        return VideoSource(video, self.image_size, fps=fps, num_threads=self.decode_threads,
                           exact=self.resize == "exact", backend=self.video_backend)

    def sample(self, source: VideoSource, max_frames: int | None = None, min_frames: int | None = None,
               start: float | None = None, end: float | None = None, frame_policy: str | None = None) -> VideoMeta:
        """Pick the frames of ``source`` by the frame policy; returns the indices and the time message.

        ``max_frames`` / ``min_frames`` override the processor's bounds (as ``max_num_frames`` of
        VideoChat-Flash's ``chat``); a ``min_frames`` above ``max_frames`` is lowered to it, except
        under ``frame_rules="videochat_flash"``, where the min wins as in the release."""
        reference = self.frame_rules == "videochat_flash"
        hi = int(max_frames) if max_frames is not None else self.max_frames
        lo = int(min_frames) if min_frames is not None else (self.min_frames if reference else min(self.min_frames, hi))
        if not reference:
            lo = min(lo, hi)
        policy = frame_policy or self.frame_policy
        if reference and (start is not None or end is not None):
            first, vlen, duration = reference_span(source.num_frames, source.fps, start, end)
            n = frame_count(vlen, source.fps, policy, lo, hi, local_num_frames=self.frames_per_clip)
            idx = [min(first + i, source.num_frames - 1) for i in middle_indices(vlen, n)]
            return VideoMeta(idx, source.num_frames, source.fps, duration, time_message(duration, len(idx)))
        idx = frame_indices(
            source.num_frames, source.fps, policy, lo, hi, start=start, end=end,
            local_num_frames=self.frames_per_clip,
        )
        if start is None and end is None:
            duration = source.duration
        else:
            first = 0 if start is None else min(max(0, int(round(float(start) * source.fps))), source.num_frames - 1)
            stop = source.num_frames if end is None else min(source.num_frames, int(round(float(end) * source.fps)))
            duration = (stop - first) / source.fps
        return VideoMeta(idx, source.num_frames, source.fps, duration, time_message(duration, len(idx)))

    def load_video(self, video, max_frames: int | None = None, min_frames: int | None = None,
                   start: float | None = None, end: float | None = None, fps: float | None = None,
                   frame_policy: str | None = None) -> tuple[torch.Tensor, VideoMeta]:
        """Sample and decode a whole video -> (uint8 ``[N, S, S, 3]``, :class:`VideoMeta`)."""
        source = self.open_video(video, fps=fps)
        meta = self.sample(source, max_frames, min_frames, start, end, frame_policy)
        try:
            frames = source.frames(meta.indices)
        finally:
            if source is not video:
                source.close()
        return frames, meta

    def iter_video_batches(self, source: VideoSource, meta: VideoMeta, batch_frames: int = 64):
        """Yield the sampled frames of ``meta`` in batches of at most ``batch_frames`` (rounded down to
        whole clips), so that a long video never exists decoded all at once."""
        step = max(self.frames_per_clip, int(batch_frames) // self.frames_per_clip * self.frames_per_clip)
        for lo in range(0, len(meta.indices), step):
            yield source.frames(meta.indices[lo : lo + step])

    # -- images ------------------------------------------------------------------------------------
    @staticmethod
    def _image_array(image) -> torch.Tensor:
        if isinstance(image, (np.ndarray, torch.Tensor)):
            arr = torch.as_tensor(image)
        else:
            try:
                from PIL import Image  # Pillow ships with torchvision (a dependency of timm)
            except ImportError as exn:  # pragma: no cover - depends on the environment
                raise ImportError("reading image files needs Pillow (pip install pillow)") from exn
            if isinstance(image, (bytes, bytearray)):
                image = Image.open(io.BytesIO(bytes(image)))
            elif isinstance(image, (str, os.PathLike)):
                image = Image.open(os.fspath(image))
            arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
        if arr.dim() != 3 or arr.shape[-1] != 3 or arr.dtype != torch.uint8:
            raise ValueError(f"an image must be uint8 [H, W, 3], got {arr.dtype} {tuple(arr.shape)}")
        return arr

    def load_images(self, images) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> thumbnail + grid tiles (``anyres``) or one square tile; several images -> one
        square tile each. Returns uint8 tiles ``[M, S, S, 3]`` and the grid (``(0, 0)`` when the tiles
        are independent)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        arrays = [self._image_array(im) for im in images]
        if not arrays:
            raise ValueError("no images")
        size = self.image_size
        if len(arrays) == 1 and self.image_mode == "anyres":
            img = arrays[0]
            grid = select_best_grid(int(img.shape[0]), int(img.shape[1]), size, self.max_grid, self._grids)
            return tile_image(img, size, grid), (int(grid[0]), int(grid[1]))
        if self.multi_image == "pad" and len(arrays) > 1:
            fill = [int(255 * m) for m in self.image_mean]
            arrays = [expand_to_square(a, fill) for a in arrays]
        return torch.cat([resize_square(a[None], size) for a in arrays]), (0, 0)

    # -- prompts -----------------------------------------------------------------------------------
    def build_messages(self, question: str, history: list[dict] | None = None, visual: bool = True,
                       time_msg: str | None = None) -> list[dict]:
        """The conversation: ``history`` (``[{"role", "content"}, ...]`` of earlier turns, the user's
        own words, no placeholder) then ``question``; the placeholder and the time message open the
        first user turn when there is visual input."""
        messages = [dict(m) for m in (history or [])]
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"history entries are {{'role': system|user|assistant, 'content': str}}, got {m}")
        messages.append({"role": "user", "content": str(question)})
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        if visual:
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            text = messages[first]["content"].replace(self.image_token, "").strip()
            head = self.image_token + "\n"
            if time_msg and self.add_time_message:
                head += time_msg.strip() + " "
            messages[first] = {"role": "user", "content": head + text}
        return messages

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` through the chat template."""
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tokenize_prompt(self, prompt: str) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(prompt, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        input_ids = torch.tensor([ids], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def prompt_inputs(self, question: str, history: list[dict] | None = None, visual: bool = True,
                      time_msg: str | None = None) -> dict[str, torch.Tensor]:
        """Token ids (``[1, L]``) and mask of the chat prompt, without any pixels."""
        return self.tokenize_prompt(self.render(self.build_messages(question, history, visual, time_msg)))

    def __call__(
        self,
        text: str | None = None,
        videos=None,
        images=None,
        history: list[dict] | None = None,
        max_frames: int | None = None,
        min_frames: int | None = None,
        start: float | None = None,
        end: float | None = None,
        fps: float | None = None,
        chat: bool = True,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Build the model inputs of one conversation turn.

        Args:
            text: the user's question (``chat=True``), or a complete prompt to tokenize as it is
                (``chat=False``; it must then hold the ``<image>`` placeholder when pixels are given).
            videos: one video (path, bytes or uint8 frames ``[N, H, W, 3]``; a one-element list is
                accepted too).
            images: one image or a list of images (path, bytes, PIL image or uint8 ``[H, W, 3]``).
            history: earlier turns ``[{"role": "user"|"assistant", "content": str}, ...]``.
            max_frames, min_frames, start, end, fps: frame sampling overrides (see :meth:`sample`).

        Returns:
            a ``BatchFeature`` with ``input_ids``, ``attention_mask`` and the pixel keys of
            docs/contracts.md (batch of one).
        """
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if text is None:
            raise ValueError("text (the question) is required")
        if isinstance(videos, (list, tuple)):
            if len(videos) != 1:
                raise ValueError("one video per call (a conversation holds one video)")
            videos = videos[0]
        if videos is not None and images is not None:
            raise ValueError("a conversation holds a video or images, not both")
        data: dict[str, torch.Tensor] = {}
        time_msg = None
        if videos is not None:
            frames, meta = self.load_video(videos, max_frames, min_frames, start, end, fps)
            time_msg = meta.time_message
            data["pixel_values_videos"] = frames
            data["video_frame_counts"] = torch.tensor([frames.shape[0]], dtype=torch.long)
        elif images is not None:
            tiles, grid = self.load_images(images)
            data["pixel_values_images"] = tiles
            data["image_tile_counts"] = torch.tensor([tiles.shape[0]], dtype=torch.long)
            data["image_grids"] = torch.tensor([grid], dtype=torch.long)
        visual = bool(data)
        if chat:
            prompt = self.render(self.build_messages(text, history, visual, time_msg))
        else:
            prompt = text
            if visual and prompt.count(self.image_token) != 1:
                raise ValueError(f"a raw prompt with visual input needs exactly one {self.image_token!r}")
        tokens = self.tokenize_prompt(prompt)
        return BatchFeature({**tokens, **data}, tensor_type=return_tensors)

    def num_visual_tokens(self, frames: int = 0, tiles: int = 0) -> int:
        """Tokens that ``frames`` video frames or ``tiles`` image tiles occupy in the LLM."""
        return frames * self.tokens_per_frame + tiles * self.tokens_per_image

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values_videos", "video_frame_counts",
                "pixel_values_images", "image_tile_counts", "image_grids"]
