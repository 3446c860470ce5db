"""VideoFlash: UMT clip encoder -> token merging -> connector -> HF LLM with progressive visual dropout.

The network of VideoChat-Flash (arXiv 2501.00574):

1. ``encode_video``: uint8 frames are normalised on the device, grouped into clips of 4 frames and
   run through the UMT encoder in ONE call for every clip of the batch; each clip's tokens are merged
   without parameters to ``tokens_per_clip`` (64, i.e. 16 per frame) and projected by the connector.
   Images are one-frame clips (the encoder's image position table), 64 tokens per tile.
2. The visual tokens replace the placeholder token in the text (one placeholder per sample).
3. The HF decoder layers of the LLM run in our own loop, so that at configured layers the visual
   tokens can be dropped (uniformly, or by the attention of the query tokens); the KV cache then
   holds a different number of tokens per layer, and decoding continues with positions consistent
   with the prefill.

This file is copied into every exported checkpoint (``trust_remote_code``): it imports only torch,
transformers and its siblings.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .anyres import resize_square
from .chunked_loss import lm_cross_entropy
from .configuration_videoflash import VideoFlashConfig
from .merging import merge_tokens
from .packing import packed_layers, splice_packed
from .umt import UMTEncoder
from .visual_dropout import keep_count, text_guided_scores, topk_keep, uniform_keep

IGNORE_INDEX = -100

# transformers 5.2x renamed the KV-cache argument of models, decoder layers and generation from
# ``past_key_values`` to ``cache`` (the old name is deprecated and goes away in 5.40). The model
# speaks whichever name the installed release declares, so it runs on old and new releases alike.
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_GENERATION_CACHE_KWARG = (
    "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)


class VideoFlashLMLoss(nn.Module):
    """The loss head: a module without parameters that reads the output head's weight inside its own
    forward. Under ZeRO-3 (``deepspeed.initialize``) a parameter read during another module's forward is
    gathered and registered as that module's external parameter, so the head's full weight is held for
    this call (and its backward) only; the module runs once per forward on every rank, whatever the
    number of chunks inside."""

    def forward(self, hidden, head: nn.Linear, targets, chunk_size: int):
        return lm_cross_entropy(hidden, head.weight, targets, head.bias, chunk_size=chunk_size)


@lru_cache(maxsize=None)
def _layer_cache_kwarg(layer_type: type) -> str:
    """The name under which a decoder layer class takes the KV cache."""
    return "cache" if "cache" in inspect.signature(layer_type.forward).parameters else "past_key_values"
VISUAL_INPUT_KEYS = (
    "pixel_values_videos",
    "video_frame_counts",
    "pixel_values_images",
    "image_tile_counts",
    "image_grids",
    "video_embeds",
)


class VideoFlashConnector(nn.Module):
    """Linear -> GELU -> Linear from the encoder width to the LLM width (VideoChat-Flash's MLP)."""

    def __init__(self, in_features: int, out_features: int, act: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


@dataclass
class _DecodeState:
    """What decoding needs to know about a prefill that dropped tokens: per stage (0 = before the
    first drop point) the 2D attention mask of the cached tokens and the next RoPE position."""

    stage_masks: list[torch.Tensor] = field(default_factory=list)
    next_positions: list[torch.Tensor] = field(default_factory=list)


class VideoFlashPreTrainedModel(PreTrainedModel):
    config_class = VideoFlashConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block", "Qwen2DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache", "past_key_values"]

    def _init_weights(self, module):
        super()._init_weights(module)
        # UMT attention carries its q and v biases as bare parameters (the k bias is zero).
        for name in ("q_bias", "v_bias"):
            bias = getattr(module, name, None)
            if isinstance(bias, nn.Parameter):
                with torch.no_grad():
                    bias.zero_()


class VideoFlashForConditionalGeneration(VideoFlashPreTrainedModel, GenerationMixin):
    """The whole VideoFlash model; see the module docstring and docs/model.md."""

    def __init__(self, config: VideoFlashConfig):
        super().__init__(config)
        v = config.vision_config
        self.vision_tower = UMTEncoder(
            width=v["width"],
            depth=v["depth"],
            num_heads=v["num_heads"],
            mlp_ratio=v["mlp_ratio"],
            patch_size=v["patch_size"],
            image_size=v["image_size"],
            frames_per_clip=v["frames_per_clip"],
            norm_eps=v["norm_eps"],
            final_norm_eps=v["final_norm_eps"],
        )
        self.connector = VideoFlashConnector(v["width"], config.text_config.hidden_size, config.connector_act)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.lm_loss = VideoFlashLMLoss()
        self.post_init()

    # -- HF plumbing ----------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    # -- sequence parallelism -----------------------------------------------------------------------
    _sequence_parallel = None

    def set_sequence_parallel(self, sequence_parallel) -> None:
        """Split the LLM's sequence over a group of ranks in training (None: off).

        ``sequence_parallel`` is any object with ``size`` (ranks in the group), ``split(x, dim)``
        (this rank's contiguous chunk), ``gather(x, dim)`` (the chunks of all ranks, differentiable),
        ``reduce_sum(x)`` (summed over the group; each rank's own share in the backward) and
        ``attn_implementation`` (the core attention, for the mask format); the LLM's attention must
        then exchange the chunks itself (the training engine registers DeepSpeed-Ulysses as
        ``attn_implementation``: ``videoflash.train.sequence_parallel``). After the visual tokens are
        spliced in, each rank runs the decoder layers on its chunk at the global positions; drop
        points gather the sequence and select over all of it, as one rank would; the loss is the
        token-weighted mean over the whole sequence on every rank; without labels, ``logits`` hold
        this rank's chunk."""
        self._sequence_parallel = sequence_parallel

    def _sp_shard(self, hidden, mask2d, positions):
        """Pad the whole sequence to a multiple of the group size and keep this rank's chunk: hidden
        states, global positions, their RoPE, and the whole sequence's attention mask. The padding
        comes last and counts as attended: no real token looks at it (causal), so SDPA's causal path
        stays exact; its outputs are never read."""
        sp = self._sequence_parallel
        pad = (-hidden.shape[1]) % sp.size
        if pad:
            hidden = F.pad(hidden, (0, 0, 0, pad))
            mask2d = F.pad(mask2d, (0, pad), value=1)
            positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, pad + 1, device=positions.device)], 1)
        mask4d = self._attention_mask(mask2d, hidden.shape[1], hidden.dtype)
        hidden, positions = sp.split(hidden, 1), sp.split(positions, 1)
        return hidden, positions, self.get_decoder().rotary_emb(hidden, positions), mask4d

    def _sp_unshard(self, hidden, length: int):
        """The whole sequence (its first ``length`` tokens) from every rank's chunk."""
        return self._sequence_parallel.gather(hidden, 1)[:, :length]

    def _sp_loss(self, hidden, labels):
        """Token-weighted mean cross-entropy over the whole sequence from this rank's chunk of hidden
        states (through the chunked loss head, like one rank's): the sums of token losses and of
        supervised tokens are reduced over the group."""
        sp = self._sequence_parallel
        padded = hidden.shape[1] * sp.size
        shifted = F.pad(labels[:, 1:], (0, padded - labels.shape[1] + 1), value=IGNORE_INDEX)
        local = sp.split(shifted, 1)
        keep = local != IGNORE_INDEX
        mean = self.lm_loss(hidden[keep], self.get_output_embeddings(), local[keep],
                            self.config.loss_chunk_size)
        count = keep.sum().to(mean.dtype)
        return sp.reduce_sum(mean * count) / sp.reduce_sum(count)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Activation checkpointing of the encoder blocks and the LLM layers (non-reentrant)."""
        self.vision_tower.gradient_checkpointing = True
        self.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs or {"use_reentrant": False}, **kwargs
        )

    def activation_checkpointing_disable(self):
        self.vision_tower.gradient_checkpointing = False
        self.language_model.activation_checkpointing_disable()

    # the names of transformers < 5
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()

    # -- vision -----------------------------------------------------------------------------------
    def _normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` -> normalised float ``[N, 3, S, S]`` on the encoder's device/dtype."""
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype}")
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must have shape [N, H, W, 3], got {tuple(frames.shape)}")
        weight = self.vision_tower.patch_embed.proj.weight
        size = self.config.image_size
        frames = frames.to(weight.device, non_blocking=True)
        if frames.shape[1] != size or frames.shape[2] != size:
            frames = resize_square(frames, size)
        x = frames.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.config.image_mean, device=x.device)[:, None, None]
        std = torch.tensor(self.config.image_std, device=x.device)[:, None, None]
        return ((x - mean) / std).to(weight.dtype)

    def encode_video(self, frames: torch.Tensor, vision_calls: int | None = None) -> torch.Tensor:
        """uint8 frames ``[N, H, W, 3]`` (N a multiple of 4) -> ``[N/4 * tokens_per_clip, hidden]``.

        With ``config.vision_clips_per_call`` 0 (the default) all clips go through the encoder in one
        call. With ``K > 0`` they go ``K`` clips at a time (normalisation, encoder, merging and
        connector per chunk), and in training each chunk is activation-checkpointed, so that forward
        and backward hold one chunk's activations. ZeRO-3 needs the same module calls on every rank: ``vision_calls`` (the
        largest chunk count over the ranks, agreed by the train room) pads with dummy chunks whose
        output is added times zero."""
        t = self.config.frames_per_clip
        if frames.shape[0] == 0 or frames.shape[0] % t:
            raise ValueError(f"a video needs a positive multiple of {t} frames, got {frames.shape[0]}")
        per_call = self.config.vision_clips_per_call
        if per_call <= 0:
            return self._encode_frames(frames)
        # uint8 frames per chunk: normalisation (a float copy of every frame, larger than a narrow
        # encoder's activations) happens inside the chunk too, and a checkpoint saves uint8 only
        chunks = list(frames.split(per_call * t, 0))
        checkpointed = self.training and torch.is_grad_enabled()
        run = self._encode_frames
        if checkpointed:
            from torch.utils.checkpoint import checkpoint

            def run(c):
                return checkpoint(self._encode_frames, c, use_reentrant=False)
        tokens = torch.cat([run(c) for c in chunks], 0)
        for _ in range(max(0, int(vision_calls or 0) - len(chunks))):  # ZeRO-3: the ranks' common count
            tokens = tokens + run(torch.zeros_like(frames[:t])).sum() * 0.0
        return tokens

    def _encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (whole clips) -> their merged, projected tokens."""
        x = self._normalize(frames)
        return self._encode_clips(x.view(-1, self.config.frames_per_clip, *x.shape[1:]))

    def _encode_clips(self, clips: torch.Tensor) -> torch.Tensor:
        feats = self.vision_tower(clips)  # [clips, t*L, width]
        merged = merge_tokens(feats, self.config.tokens_per_clip, self.config.merge_num_heads)
        return self.connector(merged).flatten(0, 1)

    def vision_calls_needed(self, frames: int) -> int:
        """Encoder calls :meth:`encode_video` makes on ``frames`` frames (a text-only batch: the
        one-clip dummy)."""
        per_call = self.config.vision_clips_per_call
        clips = max(1, frames // self.config.frames_per_clip)
        return 1 if per_call <= 0 else -(-clips // per_call)

    def encode_images(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 image tiles ``[M, H, W, 3]`` -> ``[M * tokens_per_image, hidden]`` (one-frame clips)."""
        if tiles.shape[0] == 0:
            raise ValueError("encode_images needs at least one tile")
        x = self._normalize(tiles)
        feats = self.vision_tower(x[:, None])  # [M, L, width]
        merged = merge_tokens(feats, self.config.tokens_per_image, self.config.merge_num_heads)
        return self.connector(merged).flatten(0, 1)

    def _dummy_frames(self, count: int) -> torch.Tensor:
        size = self.config.image_size
        device = self.vision_tower.patch_embed.proj.weight.device
        return torch.zeros(count, size, size, 3, dtype=torch.uint8, device=device)

    def _layout_image_tokens(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        """Tile tokens of one sample -> the LLM order: for a grid, the thumbnail's tokens first, then the
        tiles' tokens as one (gh*s) x (gw*s) raster (s*s = tokens_per_image); otherwise tile by tile."""
        gh, gw = int(grid[0]), int(grid[1])
        per = self.config.tokens_per_image
        side = int(round(per**0.5))
        if gh * gw == 0 or side * side != per:
            return tokens
        thumb, rest = tokens[:per], tokens[per:]
        rest = rest.view(gh, gw, side, side, -1).permute(0, 2, 1, 3, 4).reshape(gh * gw * per, -1)
        return torch.cat([thumb, rest], 0)

    def _visual_tokens_per_sample(
        self,
        batch_size: int,
        pixel_values_videos,
        video_frame_counts,
        pixel_values_images,
        image_tile_counts,
        image_grids,
        video_embeds=None,
        vision_calls=None,
    ):
        """Encode the batch's videos and images (one encoder call each) and split them per sample.

        ``video_embeds`` (inference) are visual tokens computed beforehand, e.g. by
        :meth:`encode_video_chunked` for a long video: ``[sum of tokens, hidden]`` in the order of
        ``video_frame_counts``; they take the place of ``encode_video(pixel_values_videos)``.

        In training, a batch without videos (or without images) still runs that path on a dummy
        input whose output is added times zero, so every rank calls every module every step and
        every trainable parameter gets a gradient."""
        per_sample: list[torch.Tensor | None] = [None] * batch_size
        anchor = None  # zero-valued term that keeps dummy outputs in the graph
        t = self.config.frames_per_clip
        has_videos = pixel_values_videos is not None and pixel_values_videos.shape[0] > 0
        if video_embeds is not None:
            if has_videos:
                raise ValueError("pass pixel_values_videos or video_embeds, not both")
            if video_frame_counts is None:
                if batch_size != 1:
                    raise ValueError("video_frame_counts is required when the batch holds several samples")
                video_frame_counts = torch.tensor([video_embeds.shape[0] // self.config.tokens_per_clip * t])
            counts = [int(c) for c in video_frame_counts]
            sizes = [c // t * self.config.tokens_per_clip for c in counts]
            if any(c % t for c in counts) or sum(sizes) != video_embeds.shape[0]:
                raise ValueError(
                    f"video_embeds hold {video_embeds.shape[0]} tokens; video_frame_counts {counts} need {sum(sizes)} "
                    f"({self.config.tokens_per_clip} per {t} frames)"
                )
            for b, (c, chunk) in enumerate(zip(counts, video_embeds.split(sizes, 0))):
                if c:
                    per_sample[b] = chunk
        elif has_videos:
            if video_frame_counts is None:
                if batch_size != 1:
                    raise ValueError("video_frame_counts is required when the batch holds several samples")
                video_frame_counts = torch.tensor([pixel_values_videos.shape[0]])
            counts = [int(c) for c in video_frame_counts]
            if sum(counts) != pixel_values_videos.shape[0] or any(c % t for c in counts):
                raise ValueError(
                    f"video_frame_counts {counts} must be multiples of {t} summing to "
                    f"{pixel_values_videos.shape[0]} frames"
                )
            tokens = self.encode_video(pixel_values_videos, vision_calls)
            chunks = tokens.split([c // t * self.config.tokens_per_clip for c in counts], 0)
            for b, (c, chunk) in enumerate(zip(counts, chunks)):
                if c:
                    per_sample[b] = chunk
        elif self.training:
            anchor = self.encode_video(self._dummy_frames(t), vision_calls).sum() * 0.0
        has_images = pixel_values_images is not None and pixel_values_images.shape[0] > 0
        if has_images:
            if image_tile_counts is None:
                if batch_size != 1:
                    raise ValueError("image_tile_counts is required when the batch holds several samples")
                image_tile_counts = torch.tensor([pixel_values_images.shape[0]])
            counts = [int(c) for c in image_tile_counts]
            if sum(counts) != pixel_values_images.shape[0]:
                raise ValueError(f"image_tile_counts {counts} do not sum to {pixel_values_images.shape[0]} tiles")
            tokens = self.encode_images(pixel_values_images)
            chunks = tokens.split([c * self.config.tokens_per_image for c in counts], 0)
            for b, (c, chunk) in enumerate(zip(counts, chunks)):
                if not c:
                    continue
                if per_sample[b] is not None:
                    raise ValueError(f"sample {b} holds both video and images; one kind per sample")
                grid = image_grids[b] if image_grids is not None else (0, 0)
                per_sample[b] = self._layout_image_tokens(chunk, grid)
        elif self.training:
            dummy = self.encode_images(self._dummy_frames(1)).sum() * 0.0
            anchor = dummy if anchor is None else anchor + dummy
        return per_sample, anchor

    # -- splicing -------------------------------------------------------------------------------------
    def _splice(self, input_ids, attention_mask, labels, per_sample, anchor, query_positions):
        """Replace each sample's placeholder by its visual tokens and re-pad the batch.

        Returns embeddings, 2D mask, labels (or None), visual span starts and counts, the query
        positions mapped into the spliced sequence (or None) and whether the batch is left-padded."""
        embed = self.get_input_embeddings()
        placeholder = input_ids == self.config.image_token_id
        n_ph = placeholder.sum(1)
        if (n_ph > 1).any():
            raise ValueError("each sample may hold at most one visual placeholder token")
        text = embed(input_ids.masked_fill(placeholder, 0))
        if anchor is not None:
            text = text + anchor.to(text.dtype)
        bsz, length = input_ids.shape
        left_padded = bool(((attention_mask[:, 0] == 0) & (attention_mask[:, -1] == 1)).any())
        rows, masks, labs, starts, counts, queries = [], [], [], [], [], []
        for b in range(bsz):
            vis = per_sample[b]
            if n_ph[b] == 0:
                if vis is not None and vis.shape[0] > 0:
                    raise ValueError(f"sample {b} has visual input but no placeholder token")
                rows.append(text[b])
                masks.append(attention_mask[b])
                labs.append(labels[b] if labels is not None else None)
                starts.append(0)
                counts.append(0)
                if query_positions is not None:
                    queries.append(int(query_positions[b]))
                continue
            if vis is None:
                raise ValueError(f"sample {b} has a placeholder token but no visual input")
            p = int(placeholder[b].nonzero()[0, 0])
            n = vis.shape[0]
            rows.append(torch.cat([text[b, :p], vis.to(text.dtype), text[b, p + 1 :]], 0))
            masks.append(torch.cat([attention_mask[b, :p], attention_mask.new_ones(n), attention_mask[b, p + 1 :]]))
            if labels is not None:
                labs.append(torch.cat([labels[b, :p], labels.new_full((n,), IGNORE_INDEX), labels[b, p + 1 :]]))
            else:
                labs.append(None)
            starts.append(p)
            counts.append(n)
            if query_positions is not None:
                q = int(query_positions[b])
                queries.append(q + n - 1 if q > p else q)
        new_len = max(r.shape[0] for r in rows)
        pads = [new_len - r.shape[0] for r in rows]
        embeds = torch.stack([_pad(r, d, 0.0, left_padded) for r, d in zip(rows, pads)])
        mask = torch.stack([_pad(m, d, 0, left_padded) for m, d in zip(masks, pads)])
        out_labels = None
        if labels is not None:
            out_labels = torch.stack([_pad(lab, d, IGNORE_INDEX, left_padded) for lab, d in zip(labs, pads)])
        shift = pads if left_padded else [0] * bsz
        starts = torch.tensor([s + d for s, d in zip(starts, shift)], device=input_ids.device)
        counts = torch.tensor(counts, device=input_ids.device)
        q = None
        if query_positions is not None:
            q = torch.tensor([x + d for x, d in zip(queries, shift)], device=input_ids.device)
        return embeds, mask, out_labels, starts, counts, q, left_padded

    # -- the LLM with drop points --------------------------------------------------------------------
    def _dropout_schedule(self) -> dict[int, tuple[float, str]]:
        """{0-indexed layer about to run: (keep ratio of the original, kind)} when dropout is active."""
        cfg = self.config
        active = cfg.visual_dropout_in_training if self.training else cfg.visual_dropout_in_inference
        if not active:
            return {}
        return {
            layer: (ratio, kind)
            for layer, ratio, kind in zip(cfg.visual_dropout_layers, cfg.visual_dropout_keep_ratios, cfg.visual_dropout_kinds)
        }

    def _attention_mask(self, mask2d: torch.Tensor, q_len: int, dtype: torch.dtype):
        """The mask the HF attention functions take: 4D additive for eager/SDPA (None where SDPA's own
        causal path is exact), the 2D padding mask for flash-attention. Under sequence parallelism it
        is the mask of the whole sequence, for the core attention that runs on it."""
        sp = self._sequence_parallel
        impl = sp.attn_implementation if sp is not None else self.language_model.config._attn_implementation
        impl = impl or "eager"
        kv_len = mask2d.shape[1]
        all_valid = bool(mask2d.all())
        if "flash" in impl:
            return None if all_valid else mask2d
        if impl == "sdpa" and all_valid and (q_len == kv_len or q_len == 1):
            return None
        past = kv_len - q_len
        rows = torch.arange(q_len, device=mask2d.device)[:, None] + past
        cols = torch.arange(kv_len, device=mask2d.device)[None, :]
        allowed = (cols <= rows)[None] & mask2d.bool()[:, None, :]
        out = torch.zeros(allowed.shape, dtype=dtype, device=mask2d.device)
        out.masked_fill_(~allowed, torch.finfo(dtype).min)
        return out[:, None]

    def _query_tokens(self, labels, mask2d, query_positions):
        """Query tokens of text-guided dropout: given positions, else (training) the token before each
        supervised answer span, else the last real token. Returns ``[B, Q]`` indices and validity; with
        labels, a sample without an answer span has no valid query, and text-guided drops skip that
        sample only (VideoChat-Flash's rule), the others keep their own queries."""
        bsz, length = mask2d.shape
        device = mask2d.device
        if query_positions is not None:
            return query_positions[:, None].long(), torch.ones(bsz, 1, dtype=torch.bool, device=device)
        if labels is not None:
            starts = (labels[:, :-1] == IGNORE_INDEX) & (labels[:, 1:] != IGNORE_INDEX)
            q = max(1, int(starts.sum(1).max().item()))
            idx = torch.zeros(bsz, q, dtype=torch.long, device=device)
            valid = torch.zeros(bsz, q, dtype=torch.bool, device=device)
            for b in range(bsz):
                pos = starts[b].nonzero()[:, 0]
                idx[b, : pos.numel()] = pos
                valid[b, : pos.numel()] = True
            return idx, valid
        positions = torch.arange(length, device=device)[None].expand(bsz, -1)
        last = torch.where(mask2d.bool(), positions, -1).max(1).values.clamp(min=0)
        return last[:, None], torch.ones(bsz, 1, dtype=torch.bool, device=device)

    def _drop(self, layer, hidden, mask2d, positions, labels, starts, counts, originals, q_idx, q_valid,
              ratio, kind, position_embeddings, left_padded):
        """Keep ``ratio`` of the original visual tokens of every sample before ``layer`` runs."""
        bsz, length, _ = hidden.shape
        device = hidden.device
        scores = None
        if kind == "text":
            # called on every rank at every drop point, whatever the data (ZeRO-3 call order)
            scores = text_guided_scores(hidden, layer, position_embeddings, q_idx, q_valid, mask2d.bool())
        keep_rows, new_counts, first_valid = [], [], []
        valid = mask2d.bool()
        for b in range(bsz):
            s, n = int(starts[b]), int(counts[b])
            k = min(keep_count(int(originals[b]), ratio), n)
            if kind == "text" and not bool(q_valid[b].any()):
                k, sel = n, torch.arange(n, device=device)  # no answer span to guide it: no drop
            elif kind == "text":
                sel = topk_keep(scores[b, s : s + n], k)
            else:
                sel = uniform_keep(n, k, device)
            # padding is stripped here and added back below, so it never accumulates
            real_pos = valid[b].nonzero()[:, 0]
            lo, hi = (int(real_pos[0]), int(real_pos[-1]) + 1) if real_pos.numel() else (0, 0)
            lo, hi = min(lo, s), max(hi, s + n)
            keep_rows.append(torch.cat([torch.arange(lo, s, device=device), s + sel, torch.arange(s + n, hi, device=device)]))
            new_counts.append(k)
            first_valid.append(lo)
        new_len = max(r.numel() for r in keep_rows)
        pads = [new_len - r.numel() for r in keep_rows]
        index = torch.stack([_pad(r, d, 0, left_padded) for r, d in zip(keep_rows, pads)])
        real = torch.stack([_pad(torch.ones_like(r, dtype=torch.bool), d, False, left_padded) for r, d in zip(keep_rows, pads)])
        hidden = torch.gather(hidden, 1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        mask2d = torch.gather(mask2d, 1, index) * real
        if self.config.visual_dropout_position == "compact":
            positions = (mask2d.cumsum(1) - 1).clamp(min=0)
        else:
            positions = torch.gather(positions, 1, index) * real
        if labels is not None:
            labels = torch.gather(labels, 1, index).masked_fill(~real, IGNORE_INDEX)
        shift = torch.tensor(pads if left_padded else [0] * bsz, device=device) - torch.tensor(first_valid, device=device)
        dropped = counts - torch.tensor(new_counts, device=device)
        after = q_idx >= (starts + counts)[:, None]
        q_idx = q_idx + shift[:, None] - torch.where(after, dropped[:, None], 0)
        starts = starts + shift
        counts = torch.tensor(new_counts, device=device)
        return hidden, mask2d, positions, labels, starts, counts, q_idx

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_frame_counts: torch.Tensor | None = None,
        pixel_values_images: torch.Tensor | None = None,
        image_tile_counts: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        dropout_query_positions: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        sample_lengths: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        vision_calls: int | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Training and prefill take the batch of docs/contracts.md; decoding steps (a cache that
        holds a prefill) take only the new ``input_ids`` and the full 2D ``attention_mask``.

        ``dropout_query_positions`` (``[B]``, indices into ``input_ids``) fixes the query token of
        text-guided dropout; by default it is the token before each answer span when ``labels`` are
        given and the last real token otherwise (the last prompt token at prefill).

        ``video_embeds`` (inference) replaces ``pixel_values_videos`` by visual tokens computed
        beforehand (:meth:`encode_video_chunked`), with the same ``video_frame_counts``.

        ``sample_lengths`` (``[rows, K]``) marks a packed batch: each row holds whole samples end to
        end, of these ``input_ids`` lengths (zeros after the last); the per-sample keys
        (``video_frame_counts``, ``dropout_query_positions``, ...) then list every sample of the
        micro-batch in order. The samples run as one flat sequence ``[1, T]`` (the logits and the
        loss are over it), each with its own positions, attention and dropout (:mod:`.packing`).

        With ``labels`` (training) the output holds the loss and no logits: only the supervised
        positions go through the output head, in chunks of ``config.loss_chunk_size`` rows
        (chunked_loss.py). ``vision_calls``: see :meth:`encode_video`."""
        if cache is None:  # the name of transformers releases before 5.2x
            cache = kwargs.pop("past_key_values", None)
        if input_ids is None:
            raise ValueError("VideoFlash needs input_ids (the visual tokens are spliced into them)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        use_cache = bool(use_cache) and not self.training
        state = getattr(cache, "_videoflash_state", None) if cache is not None else None
        decoder = self.get_decoder()
        layers = decoder.layers
        cache_kw = _layer_cache_kwarg(type(layers[0]))
        schedule = self._dropout_schedule()
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)

        if state is not None:  # a decoding step after a prefill
            q_len = input_ids.shape[1]
            hidden = self.get_input_embeddings()(input_ids)
            new_cols = attention_mask[:, -q_len:].to(state.stage_masks[0].dtype)
            steps = torch.arange(q_len, device=hidden.device)
            stage_inputs = []
            for k in range(len(state.stage_masks)):
                state.stage_masks[k] = torch.cat([state.stage_masks[k], new_cols], 1)
                pos = state.next_positions[k][:, None] + steps
                state.next_positions[k] = state.next_positions[k] + q_len
                stage_inputs.append((state.stage_masks[k], pos))
            stage = -1
            mask4d = pe = None
            for i, layer in enumerate(layers):
                if i == 0 or i in schedule:
                    stage += 1
                    mask2d, pos = stage_inputs[stage]
                    mask4d = self._attention_mask(mask2d, q_len, hidden.dtype)
                    pe = decoder.rotary_emb(hidden, pos)
                hidden = layer(hidden, attention_mask=mask4d, position_ids=pos, use_cache=True,
                               position_embeddings=pe, **{cache_kw: cache})
            new_labels = None
        elif sample_lengths is not None:  # a packed batch (training)
            if use_cache:
                raise ValueError("packed batches (sample_lengths) are for training; they cannot fill a KV cache")
            if self._sequence_parallel is not None:
                raise ValueError("packed batches (sample_lengths) and sequence parallelism do not combine; "
                                 "use one or the other (data.pack_tokens or train.sequence_parallel)")
            per_sample, anchor = self._visual_tokens_per_sample(
                int((sample_lengths > 0).sum()), pixel_values_videos, video_frame_counts, pixel_values_images,
                image_tile_counts, image_grids, video_embeds, vision_calls,
            )
            hidden, new_labels, segments = splice_packed(
                self, input_ids, attention_mask, labels, sample_lengths, per_sample, anchor, dropout_query_positions
            )
            hidden, new_labels, _ = packed_layers(self, layers, decoder, hidden, new_labels, segments, schedule, cache_kw)
        else:  # training or prefill
            sp = self._sequence_parallel
            if sp is not None and use_cache:
                raise ValueError("sequence parallelism splits training sequences; it runs without a KV cache")
            per_sample, anchor = self._visual_tokens_per_sample(
                input_ids.shape[0], pixel_values_videos, video_frame_counts, pixel_values_images,
                image_tile_counts, image_grids, video_embeds, vision_calls,
            )
            hidden, mask2d, new_labels, starts, counts, qpos, left_padded = self._splice(
                input_ids, attention_mask, labels, per_sample, anchor, dropout_query_positions
            )
            positions = (mask2d.cumsum(1) - 1).clamp(min=0)
            originals = counts.clone()
            q_idx = q_valid = None
            if any(kind == "text" for _, kind in schedule.values()):
                q_idx, q_valid = self._query_tokens(new_labels, mask2d, qpos)
            elif schedule:
                q_idx, q_valid = self._query_tokens(None, mask2d, None)
            new_state = _DecodeState() if use_cache else None
            if sp is not None:  # this rank's chunk from here on (positions stay those of the whole sequence)
                hidden, layer_pos, pe, mask4d = self._sp_shard(hidden, mask2d, positions)
            else:
                mask4d = self._attention_mask(mask2d, hidden.shape[1], hidden.dtype)
                pe = decoder.rotary_emb(hidden, positions)
                layer_pos = positions
            for i, layer in enumerate(layers):
                if i in schedule:
                    if new_state is not None:
                        new_state.stage_masks.append(mask2d)
                        new_state.next_positions.append(positions.max(1).values + 1)
                    ratio, kind = schedule[i]
                    if sp is not None:  # select over the whole sequence
                        hidden = self._sp_unshard(hidden, mask2d.shape[1])
                        pe = decoder.rotary_emb(hidden, positions)
                    hidden, mask2d, positions, new_labels, starts, counts, q_idx = self._drop(
                        layer, hidden, mask2d, positions, new_labels, starts, counts, originals, q_idx, q_valid,
                        ratio, kind, pe, left_padded,
                    )
                    if sp is not None:
                        hidden, layer_pos, pe, mask4d = self._sp_shard(hidden, mask2d, positions)
                    else:
                        mask4d = self._attention_mask(mask2d, hidden.shape[1], hidden.dtype)
                        pe = decoder.rotary_emb(hidden, positions)
                        layer_pos = positions
                hidden = layer(hidden, attention_mask=mask4d, position_ids=layer_pos, use_cache=use_cache,
                               position_embeddings=pe, **{cache_kw: cache})
            if new_state is not None:
                new_state.stage_masks.append(mask2d)
                new_state.next_positions.append(positions.max(1).values + 1)
                cache._videoflash_state = new_state

        hidden = decoder.norm(hidden)
        loss = logits = None
        if new_labels is not None and labels is not None:
            # training: no [tokens, vocabulary] logits; the hidden states of the supervised positions
            # go through the head chunk by chunk (token-weighted mean, as F.cross_entropy's)
            if self._sequence_parallel is not None:
                loss = self._sp_loss(hidden, new_labels)
            else:
                targets = new_labels[:, 1:]
                keep = targets != IGNORE_INDEX
                loss = self.lm_loss(hidden[:, :-1][keep], self.get_output_embeddings(), targets[keep],
                                    self.config.loss_chunk_size)
        else:
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            logits = self.get_output_embeddings()(hidden)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: cache if use_cache else None})

    # -- generation ---------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration=False, **kwargs):
        if cache is None:  # the name of transformers releases before 5.2x
            cache = kwargs.pop("past_key_values", None)
        visual = {key: kwargs.pop(key, None) for key in VISUAL_INPUT_KEYS}
        query = kwargs.pop("dropout_query_positions", None)
        inputs = super().prepare_inputs_for_generation(
            input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration, **{_GENERATION_CACHE_KWARG: cache}, **kwargs,
        )
        inputs.pop("position_ids", None)
        prefill = getattr(cache, "_videoflash_state", None) is None
        if prefill:
            inputs["input_ids"] = input_ids
            inputs.update({k: v for k, v in visual.items() if v is not None})
            if query is not None:
                inputs["dropout_query_positions"] = query
        return inputs

    # -- inference (the logic lives in inference_videoflash.py) ---------------------------------------
    def encode_video_chunked(self, frames, max_clips_per_batch: int = 16, total_frames: int | None = None):
        """:meth:`encode_video` under ``no_grad`` on at most ``max_clips_per_batch`` clips at a time;
        ``frames`` may be an iterable of uint8 batches (decoded batch by batch). Returns the tokens
        to pass as ``video_embeds``."""
        from .inference_videoflash import encode_video_chunked

        return encode_video_chunked(self, frames, max_clips_per_batch, total_frames)

    def enable_yarn(self, factor: float, original_max_position_embeddings: int | None = None, **kwargs) -> dict:
        """Switch the LLM's RoPE to YaRN (``factor`` over the native length); see inference_videoflash."""
        from .inference_videoflash import enable_yarn

        return enable_yarn(self, factor, original_max_position_embeddings, **kwargs)

    def disable_yarn(self) -> None:
        from .inference_videoflash import disable_yarn

        disable_yarn(self)

    def chat(
        self,
        video,
        question: str,
        processor=None,
        history: list[dict] | None = None,
        max_frames: int | None = None,
        return_history: bool = False,
        visual_dropout=None,
        streamer=None,
        generation_config: dict | None = None,
        max_clips_per_batch: int = 16,
        decode_batch_frames: int = 64,
        kv_compression=None,
        kv_budget: int | None = None,
        kv_options: dict | None = None,
        **kwargs,
    ):
        """Answer ``question`` about ``video`` (a path, bytes or uint8 frames; None for text only).

        Frames are sampled by the processor's policy (``max_frames`` caps them, as VideoChat-Flash's
        ``max_num_frames``), decoded ``decode_batch_frames`` at a time and encoded
        ``max_clips_per_batch`` clips at a time, so memory grows with the visual tokens kept.
        ``history`` holds earlier turns (``[{"role", "content"}, ...]``, as returned with
        ``return_history=True``); the video's tokens are reused across turns of the same file.
        ``visual_dropout``: None (the config's setting), ``"published"`` (after layer 4 keep 0.75
        uniformly, after layer 18 keep 0.25 text-guided), ``"none"``, or ``"4:0.75:uniform,..."``.
        ``kv_compression``: None (the whole prompt is prefilled at once), ``"adaretake"`` (the video
        is prefilled in chunks of 32 frames, each chunk's KV cache kept to the tokens the question
        attends to most, ``kv_budget`` tokens of context in all, default 16000) or ``"videox2l"``
        (two compressed KVs per chunk, the chunks relevant to each question reloaded in detail; the
        prefill is reused by later turns about the same video); ``kv_options`` are the policy's
        settings (see ``chunked_prefill.AdaReTaKe`` / ``VideoX2L``, e.g. ``{"chunk_frames": 16}``).
        ``streamer`` (e.g. ``transformers.TextStreamer``) receives tokens as they are generated.
        Other keyword arguments: ``min_frames``, ``start``/``end`` (seconds), ``images`` (instead of a
        video), and ``generate`` arguments (``max_new_tokens``, ``do_sample``, ...).
        Returns the answer, or ``(answer, history)``."""
        from .inference_videoflash import chat

        return chat(
            self, video, question, processor=processor, history=history, max_frames=max_frames,
            return_history=return_history, visual_dropout_spec=visual_dropout, streamer=streamer,
            generation_config=generation_config, max_clips_per_batch=max_clips_per_batch,
            decode_batch_frames=decode_batch_frames, kv_compression=kv_compression, kv_budget=kv_budget,
            kv_options=kv_options, **kwargs,
        )

    # -- construction from parts ----------------------------------------------------------------------
    @classmethod
    def from_parts(
        cls,
        text,
        vision=None,
        vision_config: dict | None = None,
        image_token_id: int | None = None,
        tokenizer=None,
        torch_dtype: torch.dtype | None = None,
        vision_trust_pickle: bool = False,
        **config_kwargs,
    ) -> "VideoFlashForConditionalGeneration":
        """The stage-1 starting point: an HF LLM + UMT weights (or a fresh encoder) + a new connector.

        Args:
            text: an HF causal-LM directory (weights loaded), or a config / config dict (fresh LLM).
            vision: path to (or state dict of) the released ``UMT-L_f4_vision.pt``; None = fresh encoder.
            vision_config: encoder settings; with ``vision`` only ``image_size`` and
                ``frames_per_clip`` are read (the rest comes from the weights).
            image_token_id: the placeholder id; with ``tokenizer`` it is looked up (``<image>`` is added
                to the tokenizer when missing) and the LLM's embeddings grow if the vocabulary did.
            vision_trust_pickle: unpickle ``vision`` without restriction (``UMTEncoder.from_official``'s
                ``trust_pickle``); only for a file you trust.
            config_kwargs: any other :class:`VideoFlashConfig` field.
        """
        vision_config = dict(vision_config or {})
        if isinstance(text, (str, bytes)) or hasattr(text, "__fspath__"):
            llm = AutoModelForCausalLM.from_pretrained(text, dtype=torch_dtype or torch.float32)
            text_config = copy.deepcopy(llm.config)
        else:
            llm = None
            text_config = text
        encoder = None
        if vision is not None:
            encoder = UMTEncoder.from_official(
                vision,
                image_size=vision_config.get("image_size", 224),
                frames_per_clip=vision_config.get("frames_per_clip", 4),
                num_heads=vision_config.get("num_heads"),  # default: width // 64, as UMT-L
                trust_pickle=vision_trust_pickle,
            )
            vision_config.update(encoder.encoder_config())
        if tokenizer is not None:
            if "<image>" not in tokenizer.get_vocab():
                tokenizer.add_tokens(["<image>"], special_tokens=True)
            image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        config = VideoFlashConfig(vision_config=vision_config, text_config=text_config,
                                  image_token_id=image_token_id, **config_kwargs)
        if tokenizer is not None and len(tokenizer) > config.text_config.vocab_size:
            config.text_config.vocab_size = len(tokenizer)
        model = cls(config)
        if llm is not None:
            if len(tokenizer or []) > llm.config.vocab_size:
                llm.resize_token_embeddings(len(tokenizer))
            model.language_model.load_state_dict(llm.state_dict())
        if encoder is not None:
            model.vision_tower.load_state_dict(encoder.state_dict())
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model


def _pad(x: torch.Tensor, amount: int, value, left: bool) -> torch.Tensor:
    """Pad a 1D/2D tensor along its first dimension on the left or right."""
    if amount == 0:
        return x
    filler = x.new_full((amount, *x.shape[1:]), value)
    return torch.cat([filler, x] if left else [x, filler], 0)
