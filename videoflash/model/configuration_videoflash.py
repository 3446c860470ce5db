"""Configuration of a VideoFlash model.

A VideoFlash model is a UMT video encoder (run on 4-frame clips), parameter-free token merging
(64 tokens per clip, i.e. 16 per frame, and 64 per image tile), a Linear-GELU-Linear connector and a
Hugging Face causal LM (Qwen2 / Qwen2.5) that can drop visual tokens progressively inside its layers
(VideoChat-Flash, arXiv 2501.00574, §2: "video-level compression").

This file is part of the self-contained model package that export copies into every checkpoint:
it imports only transformers and the standard library.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

#: UMT-L as used by VideoChat-Flash: 24 blocks in the released file, the output of block 22 is used
#: (``mm_vision_select_layer = -2``), so 23 blocks are built and run.
UMT_L_VISION = dict(
    width=1024,
    depth=23,
    num_heads=16,
    mlp_ratio=4.0,
    patch_size=16,
    image_size=224,
    frames_per_clip=4,
    norm_eps=1e-6,
    final_norm_eps=1e-12,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DROPOUT_KINDS = ("uniform", "text")
POSITION_MODES = ("compact", "keep")


def _text_config_from(value) -> PretrainedConfig:
    """Accept a PretrainedConfig, a dict (with or without ``model_type``) or None (a tiny Qwen2)."""
    if isinstance(value, PretrainedConfig):
        return value
    if value is None:
        value = {}
    value = dict(value)
    model_type = value.pop("model_type", "qwen2")
    return AutoConfig.for_model(model_type, **value)


class VideoFlashConfig(PretrainedConfig):
    r"""Everything needed to build a :class:`VideoFlashForConditionalGeneration`.

    Args:
        vision_config: the UMT encoder: ``width``, ``depth`` (blocks built and run), ``num_heads``,
            ``mlp_ratio``, ``patch_size``, ``image_size`` (224 or 448), ``frames_per_clip`` (4),
            ``norm_eps``, ``final_norm_eps``; ``select_layer`` is kept for the record
            (VideoChat-Flash uses -2: the second-to-last of the 24 released blocks).
        text_config: any Qwen2 / Qwen2.5 config (or another HF decoder with the same layer API).
        tokens_per_clip: tokens left by merging per clip of ``frames_per_clip`` frames (64).
        tokens_per_image: tokens left by merging per image or image tile (64).
        merge_num_heads: chunks averaged for the merge similarity metric (the encoder's heads).
        connector_act: activation between the two connector layers.
        image_token_id: id of the placeholder token that the visual tokens replace.
        max_grid: largest tile grid side for high-resolution images (6 -> up to 6x6 tiles).
        visual_dropout_layers: 1-indexed LLM layers after which visual tokens are dropped.
        visual_dropout_keep_ratios: the share of the ORIGINAL visual tokens kept after each point.
        visual_dropout_kinds: ``"uniform"`` (evenly spaced) or ``"text"`` (text-guided top-k) per point.
        visual_dropout_position: ``"compact"`` (positions renumbered after a drop, as VideoChat-Flash)
            or ``"keep"`` (kept tokens keep their original RoPE positions).
        visual_dropout_in_training / visual_dropout_in_inference: where dropout is active.
        image_mean / image_std: normalisation applied on the device to uint8 frames.
        vision_clips_per_call: clips per encoder call (0: all clips of a batch in one call); in
            training each call is activation-checkpointed (memory bounded by one call's clips).
        loss_chunk_size: rows of the output head's logits computed at a time by the training loss
            (only supervised positions; never ``[tokens, vocabulary]``).
    """

    model_type = "videoflash"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | None = None,
        text_config=None,
        tokens_per_clip: int = 64,
        tokens_per_image: int = 64,
        merge_num_heads: int | None = None,
        connector_act: str = "gelu",
        image_token_id: int | None = None,
        max_grid: int = 6,
        visual_dropout_layers: list[int] | None = None,
        visual_dropout_keep_ratios: list[float] | None = None,
        visual_dropout_kinds: list[str] | None = None,
        visual_dropout_position: str = "compact",
        visual_dropout_in_training: bool = False,
        visual_dropout_in_inference: bool = False,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        vision_clips_per_call: int = 0,
        loss_chunk_size: int = 4096,
        **kwargs,
    ):
        vision = dict(UMT_L_VISION)
        vision.update(vision_config or {})
        self.vision_config = vision
        self.text_config = _text_config_from(text_config)
        self.tokens_per_clip = int(tokens_per_clip)
        self.tokens_per_image = int(tokens_per_image)
        self.merge_num_heads = int(merge_num_heads or vision["num_heads"])
        self.connector_act = connector_act
        vocab = self.text_config.vocab_size
        self.image_token_id = int(image_token_id) if image_token_id is not None else vocab - 1
        self.max_grid = int(max_grid)
        self.visual_dropout_layers = [int(x) for x in (visual_dropout_layers or [])]
        self.visual_dropout_keep_ratios = [float(x) for x in (visual_dropout_keep_ratios or [])]
        self.visual_dropout_kinds = list(visual_dropout_kinds or ["uniform"] * len(self.visual_dropout_layers))
        self.visual_dropout_position = visual_dropout_position
        self.visual_dropout_in_training = bool(visual_dropout_in_training)
        self.visual_dropout_in_inference = bool(visual_dropout_in_inference)
        self.image_mean = [float(x) for x in image_mean]
        self.image_std = [float(x) for x in image_std]
        self.vision_clips_per_call = int(vision_clips_per_call)
        self.loss_chunk_size = int(loss_chunk_size)
        if self.vision_clips_per_call < 0:
            raise ValueError(f"vision_clips_per_call must be >= 0 (0: one call), got {vision_clips_per_call}")
        if self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1, got {loss_chunk_size}")
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        self.validate_visual_dropout()

    # -- derived quantities -------------------------------------------------------------------
    @property
    def frames_per_clip(self) -> int:
        return int(self.vision_config["frames_per_clip"])

    @property
    def tokens_per_frame(self) -> int:
        return self.tokens_per_clip // self.frames_per_clip

    @property
    def image_size(self) -> int:
        return int(self.vision_config["image_size"])

    def num_visual_tokens(self, frames: int = 0, tiles: int = 0) -> int:
        """Visual tokens a sample with ``frames`` video frames or ``tiles`` image tiles occupies."""
        return frames // self.frames_per_clip * self.tokens_per_clip + tiles * self.tokens_per_image

    def validate_visual_dropout(self) -> None:
        """Check the dropout schedule; raises ValueError naming the offending field."""
        n = len(self.visual_dropout_layers)
        if len(self.visual_dropout_keep_ratios) != n:
            raise ValueError(
                "visual_dropout_keep_ratios must have one ratio per entry of visual_dropout_layers "
                f"({len(self.visual_dropout_keep_ratios)} vs {n})"
            )
        if len(self.visual_dropout_kinds) != n:
            raise ValueError(f"visual_dropout_kinds must have {n} entries, got {self.visual_dropout_kinds}")
        for kind in self.visual_dropout_kinds:
            if kind not in DROPOUT_KINDS:
                raise ValueError(f"visual_dropout_kinds: unknown kind {kind!r} (expected one of {DROPOUT_KINDS})")
        if self.visual_dropout_position not in POSITION_MODES:
            raise ValueError(
                f"visual_dropout_position: {self.visual_dropout_position!r} is not one of {POSITION_MODES}"
            )
        layers = self.text_config.num_hidden_layers
        prev_layer, prev_ratio = 0, 1.0
        for layer, ratio in zip(self.visual_dropout_layers, self.visual_dropout_keep_ratios):
            if not 1 <= layer < layers:
                raise ValueError(f"visual_dropout_layers: {layer} is outside 1..{layers - 1}")
            if layer <= prev_layer:
                raise ValueError("visual_dropout_layers must be strictly increasing")
            if not 0.0 < ratio <= prev_ratio:
                raise ValueError(
                    "visual_dropout_keep_ratios must be in (0, 1] and non-increasing "
                    f"(they are shares of the original visual tokens), got {self.visual_dropout_keep_ratios}"
                )
            prev_layer, prev_ratio = layer, ratio

    def set_visual_dropout(self, layers, keep_ratios, kinds, position="compact", training=None, inference=None):
        """Replace the dropout schedule, e.g. the published inference setting
        ``set_visual_dropout([4, 18], [0.75, 0.25], ["uniform", "text"], inference=True)``."""
        self.visual_dropout_layers = [int(x) for x in layers]
        self.visual_dropout_keep_ratios = [float(x) for x in keep_ratios]
        self.visual_dropout_kinds = list(kinds)
        self.visual_dropout_position = position
        if training is not None:
            self.visual_dropout_in_training = bool(training)
        if inference is not None:
            self.visual_dropout_in_inference = bool(inference)
        self.validate_visual_dropout()


# transformers' public registry: with the type registered, AutoConfig (and AutoTokenizer, which reads
# the config first) resolve an export's config.json to this class in-process instead of falling
# back to a bare PretrainedConfig with a warning. A remote-code copy of this file re-registers its
# own class, hence exist_ok.
AutoConfig.register(VideoFlashConfig.model_type, VideoFlashConfig, exist_ok=True)
