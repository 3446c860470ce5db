"""The stage's training batches: typed config -> ``videoflash.data.build_loader``.

What comes from where:

- sources (shards and weights) from ``data.sources``; a source's ``shards`` is a brace pattern
  (``/d/train-{000000..000015}.tar``) or the ``{prefix}-index.json`` that ``data_tools.make_shards``
  wrote (every shard it lists);
- frames, image size and mode, prompt format and the sample length limit from the stage;
- visual tokens per frame / per image tile from the model's own config (never assumed);
- samples per micro-batch: ``stage.micro_batch_size``; the token budget of a micro-batch is
  ``data.max_batch_tokens`` or, when null, ``micro_batch_size * stage.max_tokens`` (so every
  micro-batch holds exactly ``micro_batch_size`` samples and the global batch is exact);
- packing (``data.pack_tokens``): rows of at most that many tokens, ``stage.micro_batch_size`` rows
  per micro-batch; an epoch of the loader is counted as if each row held one sample (an upper
  bound: the stream reads on through the mix's next epochs), the stage's length is ``stage.max_steps``;
- one epoch = the sources' samples (from their indexes, or ``data.num_samples``, which is then also
  the loader's ``samples_per_epoch``) split over ranks.
"""

from __future__ import annotations

import json
import math
import os

from videoflash.config.schema import VideoFlashSchema


class MissingDataError(FileNotFoundError):
    """A source's shards (or their index) do not exist."""


def check_sources(cfg: VideoFlashSchema) -> None:
    """Fail before any heavy work when a local source is missing, naming the source and the path."""
    import braceexpand

    for i, src in enumerate(cfg.data.sources):
        if "://" in src.shards or src.shards.startswith("pipe:"):
            continue
        first = src.shards if src.shards.endswith("-index.json") else next(iter(braceexpand.braceexpand(src.shards.split("::")[0])))
        if not os.path.exists(first):
            hint = " (make quickstart generates the synthetic corpus)" if cfg.data.synthetic is not None else ""
            raise MissingDataError(f"data.sources[{i}] ({src.name}): {first} does not exist{hint}")


def shard_pattern(shards: str) -> str:
    """A brace pattern for ``shards``; an index file stands for all of its shards."""
    if not shards.endswith("-index.json"):
        return shards
    with open(shards) as f:
        index = json.load(f)
    prefix = shards[: -len("-index.json")]
    count = int(index["num_shards"])
    if count < 1:
        raise ValueError(f"{shards} lists no shard")
    return f"{prefix}-{{000000..{count - 1:06d}}}.tar" if count > 1 else f"{prefix}-000000.tar"


def loader_config(cfg: VideoFlashSchema, model_config, world_size: int):
    from videoflash.data.pipeline import DataSource, LoaderConfig

    stage, data = cfg.stage, cfg.data
    sources = [DataSource(shards=shard_pattern(s.shards), name=s.name, weight=s.weight) for s in data.sources]
    per_rank = stage.micro_batch_size * world_size
    samples = data.num_samples
    if samples is None:
        from videoflash.data import resolve_sources

        samples = sum(s.num_samples for s in resolve_sources(sources))
    return LoaderConfig(
        sources=sources,
        image_size=stage.image_size,
        frame_policy=stage.frames.sampling,
        min_frames=stage.frames.min_frames,
        max_frames=stage.frames.max_frames,
        local_num_frames=model_config.frames_per_clip,
        image_mode=stage.image_mode,
        max_image_grid=model_config.max_grid,
        tokens_per_frame=model_config.tokens_per_frame,
        tokens_per_image=model_config.tokens_per_image,
        conversation_format=stage.prompt_format,
        max_tokens_per_batch=data.max_batch_tokens or stage.micro_batch_size * stage.max_tokens,
        max_batch_size=stage.micro_batch_size,
        max_sample_tokens=stage.max_tokens,
        batches_per_epoch=max(1, math.ceil(samples / per_rank)),
        samples_per_epoch=data.num_samples,
        num_workers=data.num_workers,
        seed=cfg.seed + 1000 * stage.id,
        shuffle_buffer=data.shuffle_buffer,
        decode_isolation=data.decode_isolation,
        decode_timeout_s=data.decode_timeout_s,
        video_backend=data.video_backend,
        pack_tokens=data.pack_tokens or None,
        pack_rows=stage.micro_batch_size,
    ), samples


def build_train_loader(cfg: VideoFlashSchema, tokenizer, model_config, rank: int, world_size: int):
    """This rank's resumable loader and the number of samples in one epoch of the mix."""
    from videoflash.data.pipeline import build_loader

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lcfg, samples = loader_config(cfg, model_config, world_size)
    return build_loader(lcfg, tokenizer, rank=rank, world_size=world_size), samples
