"""Model FLOPs of a training step, counted analytically (the formula is in docs/training.md).

Counted per micro-batch from the batch itself (clips, tiles, real tokens per sample):

- **UMT encoder**, per clip of ``T`` frames (``T = 1`` for an image tile) with ``P = T * (S/p)^2``
  patches of width ``w``, ``d`` blocks, MLP ratio ``r``:
  ``2 * P * 3p^2 * w`` (patch embedding) ``+ d * (2 * P * w^2 * (4 + 2r) + 4 * P^2 * w)``
  (qkv + output projection + MLP, then the two attention matmuls). Token merging is negligible.
- **Connector**, per visual token: ``2 * (w * h + h * h)``.
- **LLM**, per sample of ``n`` real tokens: ``2 * n * N_layers`` (every linear layer of the decoder,
  ``N_layers`` weights) ``+ 2 * L * n^2 * h`` (causal attention: half of the ``4 * n^2 * h`` of full
  attention, per layer); and the **output head** ``2 * s * h * V`` over the micro-batch's ``s``
  supervised tokens only: in training the model runs the head at the labelled positions alone
  (``labels[:, 1:] != -100``, the targets of the shifted loss), not at every position. A batch
  without labels counts the head at every real token (logits everywhere).

A forward costs F; the backward costs F for the gradient with respect to the module's input (needed
when anything before it trains) plus F for its weights (when it trains). So a module's training cost
is F x (1 + [something upstream trains] + [it trains]): the LLM counts 3F in stages 2-3 and 2F in
stages 1 and 4; a frozen encoder (stage 1) only F. Activation-checkpointing recomputation is hardware
work, not model work, and is not counted (this is the numerator of MFU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

# Dense bf16 peak, TFLOP/s per device (no sparsity), by a substring of the device name.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("H800", 989.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A6000", 155.0),
    ("A10", 125.0),
    ("L4", 121.0),
    ("4090", 165.0),
    ("V100", 125.0),
)


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


@dataclass(frozen=True)
class FlopsModel:
    """The dimensions the count needs, taken from a ``VideoFlashConfig`` (see :meth:`from_config`)."""

    width: int
    depth: int
    mlp_ratio: float
    patch_size: int
    image_size: int
    frames_per_clip: int
    tokens_per_clip: int
    tokens_per_image: int
    hidden: int
    layers: int
    layer_weights: int  # weights of all linear layers of the decoder (attention + MLP)
    vocab: int
    train_vision: bool
    train_connector: bool
    train_llm: bool

    @classmethod
    def from_config(cls, config, trainable: list[str]) -> "FlopsModel":
        v, t = config.vision_config, config.text_config
        h, layers = t.hidden_size, t.num_hidden_layers
        heads = t.num_attention_heads
        head_dim = getattr(t, "head_dim", None) or h // heads
        kv = getattr(t, "num_key_value_heads", None) or heads
        attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
        mlp = 3 * h * t.intermediate_size  # gate, up, down (SwiGLU)
        return cls(
            width=v["width"], depth=v["depth"], mlp_ratio=float(v["mlp_ratio"]), patch_size=v["patch_size"],
            image_size=v["image_size"], frames_per_clip=v["frames_per_clip"],
            tokens_per_clip=config.tokens_per_clip, tokens_per_image=config.tokens_per_image,
            hidden=h, layers=layers, layer_weights=layers * (attn + mlp), vocab=t.vocab_size,
            train_vision="vision_tower" in trainable, train_connector="connector" in trainable,
            train_llm="language_model" in trainable,
        )

    # -- forward FLOPs ------------------------------------------------------------------------------
    def encoder_forward(self, frames: int) -> float:
        """One encoder call on a clip of ``frames`` frames (1 for an image tile)."""
        w, p = self.width, self.patch_size
        patches = frames * (self.image_size // p) ** 2
        embed = 2 * patches * 3 * p * p * w
        blocks = self.depth * (2 * patches * w * w * (4 + 2 * self.mlp_ratio) + 4 * patches**2 * w)
        return float(embed + blocks)

    def connector_forward(self, tokens: int) -> float:
        return float(2 * tokens * (self.width * self.hidden + self.hidden * self.hidden))

    def llm_forward(self, seq_len: int, head_rows: int | None = None) -> float:
        """The decoder on one sequence of ``seq_len`` tokens and the output head on ``head_rows`` of
        them (None: every token, as a forward without labels)."""
        n = seq_len
        body = 2 * n * self.layer_weights + 2 * self.layers * n * n * self.hidden
        return float(body) + self.head_forward(n if head_rows is None else head_rows)

    def head_forward(self, rows: int) -> float:
        """The output head (``[rows, h] @ [h, V]``) on ``rows`` positions."""
        return float(2 * rows * self.hidden * self.vocab)

    # -- a micro-batch --------------------------------------------------------------------------------
    def batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Training FLOPs of one micro-batch, per part and in total."""
        frames = batch.get("video_frame_counts")
        clips = int(frames.sum().item()) // self.frames_per_clip if frames is not None else 0
        tiles = batch.get("image_tile_counts")
        tiles = int(tiles.sum().item()) if tiles is not None else 0
        visual_tokens = clips * self.tokens_per_clip + tiles * self.tokens_per_image
        lengths = self.sequence_lengths(batch)

        mult_vision = 3 if self.train_vision else 1
        mult_connector = 1 + int(self.train_vision) + int(self.train_connector)
        upstream = self.train_vision or self.train_connector
        mult_llm = 1 + int(upstream or self.train_llm) + int(self.train_llm)
        vision = mult_vision * (clips * self.encoder_forward(self.frames_per_clip) + tiles * self.encoder_forward(1))
        connector = mult_connector * self.connector_forward(visual_tokens)
        supervised = self.supervised_tokens(batch)
        if supervised is None:  # no labels: logits at every real token
            llm = mult_llm * sum(self.llm_forward(n) for n in lengths)
        else:
            llm = mult_llm * (sum(self.llm_forward(n, head_rows=0) for n in lengths) + self.head_forward(supervised))
        return {"vision": vision, "connector": connector, "llm": llm, "total": vision + connector + llm}

    @staticmethod
    def supervised_tokens(batch: Mapping[str, torch.Tensor]) -> int | None:
        """Positions the training loss runs the head on: the labelled tokens that are not the first
        of a sample (the shifted loss predicts a sample's tokens from its own earlier ones; a packed
        row ignores each sample's first label, ``sample_lengths`` giving where they start); None
        without labels."""
        labels = batch.get("labels")
        if labels is None:
            return None
        keep = labels != -100
        lengths = batch.get("sample_lengths")
        if lengths is None:
            keep[:, 0] = False
        else:
            for row, row_lengths in enumerate(lengths.tolist()):
                start = 0
                for n in row_lengths:
                    if n:
                        keep[row, start] = False
                        start += n
        return int(keep.sum())

    def sequence_lengths(self, batch: Mapping[str, torch.Tensor]) -> list[int]:
        """Real tokens of each sample after splicing: its text tokens plus its visual tokens."""
        if "num_text_tokens" in batch and "num_visual_tokens" in batch:
            return [int(a) + int(b) for a, b in zip(batch["num_text_tokens"].tolist(), batch["num_visual_tokens"].tolist())]
        text = batch["attention_mask"].sum(1).tolist()
        return [int(n) for n in text]
