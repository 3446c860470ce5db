"""Collation into the batch of docs/contracts.md section 1.

A :class:`Sample` is one decoded, tokenized training sample; :func:`collate` right-pads the token ids
with ``pad_token_id``, builds the attention mask, pads labels with ``-100`` and concatenates the
uint8 frames and image tiles of the micro-batch, sample after sample. :func:`collate_packed` puts
several samples end to end in each row instead and says where each one is (``sample_lengths``);
the per-sample keys then list every sample of the micro-batch, row after row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import get_worker_info

from .conversation import IGNORE_INDEX

__all__ = ["Sample", "collate", "collate_packed", "BATCH_KEYS", "PACKED_BATCH_KEYS"]

#: keys of a batch; the first eight are the model's ``forward`` arguments
BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "labels",
    "pixel_values_videos",
    "video_frame_counts",
    "pixel_values_images",
    "image_tile_counts",
    "image_grids",
    "num_visual_tokens",
    "num_text_tokens",
    "keys",
    "sources",
)
#: keys of a packed batch: ``sample_lengths`` (a ninth argument of the model's ``forward``) added
PACKED_BATCH_KEYS = (*BATCH_KEYS[:8], "sample_lengths", *BATCH_KEYS[8:])


@dataclass
class Sample:
    """One training sample, ready to batch.

    ``frames``: uint8 ``[F, S, S, 3]`` (F a multiple of 4) or None; ``tiles``: uint8 ``[M, S, S, 3]``
    or None; ``grid``: ``(gh, gw)`` of an anyres image, ``(0, 0)`` otherwise.
    ``num_text_tokens`` counts the ids without the placeholder; the model's sequence for the sample is
    ``num_text_tokens + num_visual_tokens`` long.
    """

    key: str
    source: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    frames: torch.Tensor | None = None
    tiles: torch.Tensor | None = None
    grid: tuple[int, int] = (0, 0)
    num_visual_tokens: int = 0
    num_text_tokens: int = 0

    @property
    def length(self) -> int:
        """Tokens of the sample in the LLM once the visual tokens replace the placeholder."""
        return self.num_text_tokens + self.num_visual_tokens


def worker_uint8(numel: int) -> torch.Tensor:
    """A new uint8 tensor of ``numel`` elements; inside a DataLoader worker, in shared memory, so that
    sending it to the main process costs no copy. It is allocated there directly, as DataLoader's own
    collate does (``torch.empty(...).share_memory_()`` would copy the fresh tensor into a new shared
    segment: 50-300 ms for 45 MB of frames on a 2-core machine, against 10-25 ms)."""
    if numel and get_worker_info() is not None:
        return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(int(numel)))
    return torch.empty(int(numel), dtype=torch.uint8)


def _concat(parts: list[torch.Tensor], size: int) -> torch.Tensor:
    """Concatenate uint8 ``[n, S, S, 3]`` parts into memory the batch can travel in (see
    :func:`worker_uint8`); a single part already there (a stream's decoded video) is the result."""
    rows = sum(int(p.shape[0]) for p in parts)
    shape = (rows, size, size, 3)
    if parts and tuple(parts[0].shape[1:]) != shape[1:]:
        raise ValueError(f"expected frames/tiles of {shape[1:]}, got {tuple(parts[0].shape[1:])}")
    if len(parts) == 1 and parts[0].is_contiguous() and (parts[0].is_shared() or get_worker_info() is None):
        return parts[0]
    out = worker_uint8(math.prod(shape)).view(shape)
    if parts:
        torch.cat(parts, out=out)
    return out


def collate(samples: list[Sample], pad_token_id: int, image_size: int) -> dict:
    """Batch ``samples`` (see docs/contracts.md section 1 for every key)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    return _batch([[s] for s in samples], pad_token_id, image_size)


def collate_packed(rows: list[list[Sample]], pad_token_id: int, image_size: int) -> dict:
    """Batch packed ``rows``: each row holds its samples end to end, then right padding;
    ``sample_lengths[r]`` gives the ``input_ids`` lengths of row ``r``'s samples (zeros after the
    last). The per-sample keys list every sample, row after row."""
    if not rows or not all(rows):
        raise ValueError("cannot collate an empty packed batch (or an empty row)")
    batch = _batch(rows, pad_token_id, image_size)
    k = max(len(r) for r in rows)
    lengths = torch.zeros((len(rows), k), dtype=torch.long)
    for i, row in enumerate(rows):
        lengths[i, : len(row)] = torch.tensor([int(s.input_ids.numel()) for s in row], dtype=torch.long)
    return {key: (lengths if key == "sample_lengths" else batch[key]) for key in PACKED_BATCH_KEYS}


def _batch(rows: list[list[Sample]], pad_token_id: int, image_size: int) -> dict:
    b = len(rows)
    seq = max(sum(int(s.input_ids.numel()) for s in row) for row in rows)
    input_ids = torch.full((b, seq), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((b, seq), dtype=torch.long)
    labels = torch.full((b, seq), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for s in row:
            n = int(s.input_ids.numel())
            input_ids[i, at : at + n] = s.input_ids
            attention_mask[i, at : at + n] = 1
            labels[i, at : at + n] = s.labels
            at += n
    samples = [s for row in rows for s in row]
    b = len(samples)
    frames = [s.frames for s in samples if s.frames is not None and s.frames.shape[0]]
    tiles = [s.tiles for s in samples if s.tiles is not None and s.tiles.shape[0]]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values_videos": _concat(frames, image_size),
        "video_frame_counts": torch.tensor(
            [0 if s.frames is None else int(s.frames.shape[0]) for s in samples], dtype=torch.long
        ),
        "pixel_values_images": _concat(tiles, image_size),
        "image_tile_counts": torch.tensor([0 if s.tiles is None else int(s.tiles.shape[0]) for s in samples], dtype=torch.long),
        "image_grids": torch.tensor([list(s.grid) for s in samples], dtype=torch.long).reshape(b, 2),
        "num_visual_tokens": torch.tensor([s.num_visual_tokens for s in samples], dtype=torch.long),
        "num_text_tokens": torch.tensor([s.num_text_tokens for s in samples], dtype=torch.long),
        "keys": [s.key for s in samples],
        "sources": [s.source for s in samples],
    }
