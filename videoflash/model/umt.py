"""UMT-L: the clip encoder of VideoChat-Flash.

VideoChat-Flash (arXiv 2501.00574) encodes a long video clip by clip: frames sampled at about 1 fps
are grouped into clips of 4 consecutive frames, and each clip goes through UMT-L, a plain ViT-L
(VideoMAE / UMT style) whose attention spans all patches of the 4 frames jointly. Its output tokens
are then merged without parameters to 64 per clip (``merging.py``) and projected into the LLM.
The paper calls this the *clip-level* half of its hierarchical compression; this file is the encoder
half of that step (reference: ``shared/reference/videochat_flash.md`` section 1.2).

What the released encoder is, and what this module reproduces:

- **Patch embedding.** A Conv3d with kernel = stride = (1, 16, 16): tubelet size 1, so every frame is
  cut into its own 16x16 patches (14x14 per frame at 224 px, 28x28 at 448 px).
- **Position embedding.** Not learned and not stored in the checkpoint: the fixed sinusoid table of
  the transformer paper (sin on even channels, cos on odd ones, base 10000) over the *flattened*
  (T, H/16, W/16) grid of a 4-frame clip, and a separate table over the (H/16, W/16) grid for
  one-frame inputs (images and image tiles). Both are defined at the 224 px grid (14x14); at 448 px
  they are resized frame by frame to 28x28 with bicubic interpolation (align_corners=False).
- **Blocks.** Pre-norm transformer blocks: LayerNorm (eps 1e-6) -> multi-head softmax attention
  (scale head_dim^-0.5; a qkv projection without bias of its own, plus learned q and v biases and a
  zero k bias, as in BEiT / VideoMAE) -> residual; LayerNorm -> GELU MLP (ratio 4) -> residual.
  No class token, no layer scale, no drop path.
- **Which layer is used.** ``mm_vision_select_layer = -2``: of the 24 blocks in the file only the
  first 23 are built and run, followed by the final LayerNorm (eps 1e-12, called ``norm`` in the
  UMT file and ``vision_layernorm`` in the VideoChat-Flash checkpoints).
- **Attention kernel.** flash-attn's packed-qkv kernel on CUDA in fp16/bf16 when it is installed,
  PyTorch's ``scaled_dot_product_attention`` otherwise (CPU, fp32, no flash-attn).

Parameter names are those of the official file without its ``encoder.`` prefix, so
``UMTEncoder.from_official`` loads ``UMT-L_f4_vision.pt`` strictly, and an exported checkpoint keeps
the same names under the model's own prefix.

This file imports only torch, timm and the standard library: it is copied verbatim into every
exported Hugging Face checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

from .safe_load import load_torch_file

try:  # optional, CUDA only; any failure (missing package, broken build) falls back to SDPA
    from flash_attn import flash_attn_qkvpacked_func as _flash_attn_qkvpacked_func
except Exception:  # noqa: BLE001
    _flash_attn_qkvpacked_func = None

__all__ = [
    "UMTEncoder",
    "UMTCheckpointError",
    "sinusoid_table",
    "resize_table_per_frame",
    "flash_attn_available",
]

#: The resolution at which the fixed position tables are defined (the checkpoint's 14x14 grid).
TABLE_IMAGE_SIZE = 224


class UMTCheckpointError(ValueError):
    """A state dict that is not (or not a complete) official UMT encoder layout."""


def flash_attn_available() -> bool:
    """Whether flash-attn's packed-qkv kernel could be imported."""
    return _flash_attn_qkvpacked_func is not None


# --------------------------------------------------------------------------------------------------
# Fixed position tables
# --------------------------------------------------------------------------------------------------


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """The transformer paper's fixed sinusoid table, float32 ``[num_positions, dim]``.

    Channel ``j`` of position ``p`` holds ``sin(p / 10000^(2*(j//2)/dim))`` for even ``j`` and
    ``cos(...)`` of the same angle for odd ``j``. Computed in float64, returned in float32.
    """
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2.0 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.empty(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float()


def resize_table_per_frame(table: torch.Tensor, frames: int, grid: int, new_grid: int) -> torch.Tensor:
    """Resize a flattened ``[frames*grid*grid, C]`` table to ``[frames*new_grid*new_grid, C]``.

    Every frame's ``grid x grid`` slice is resized on its own (bicubic, align_corners=False); the
    temporal axis is untouched. The result is flattened back in (T, H, W) order.
    """
    if new_grid == grid:
        return table
    c = table.shape[-1]
    t = table.reshape(frames, grid, grid, c).permute(0, 3, 1, 2)  # [T, C, grid, grid]
    t = F.interpolate(t, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(frames * new_grid * new_grid, c)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Per-frame 16x16 patches: Conv3d with kernel = stride = (1, p, p) (tubelet size 1)."""

    def __init__(self, width: int, patch_size: int, in_chans: int = 3):
        super().__init__()
        k = (1, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, width, kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, H, W]`` -> ``[B, T*(H/p)*(W/p), width]``, flattened in (T, H, W) order."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head softmax attention with the BEiT/VideoMAE bias layout (q and v biases, k bias 0)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)
        #: set False to force the SDPA path even where flash-attn would be used
        self.use_flash_attn = True

    def _flash_ok(self, qkv: torch.Tensor) -> bool:
        return (
            self.use_flash_attn
            and _flash_attn_qkvpacked_func is not None
            and qkv.is_cuda
            and qkv.dtype in (torch.float16, torch.bfloat16)
            and self.head_dim <= 256
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # self.qkv is called as a module (not F.linear on its weight) so that ZeRO-3 gathers it;
        # the biases are this module's own parameters and are gathered with it.
        qkv = self.qkv(x)
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias]).to(qkv.dtype)
        qkv = (qkv + bias).reshape(b, n, 3, self.num_heads, self.head_dim)
        if self._flash_ok(qkv):
            out = _flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=self.scale, causal=False)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=False, scale=self.scale)
            out = out.transpose(1, 2)  # [B, N, heads, head_dim]
        return self.proj(out.reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = Mlp(width, hidden_features=int(round(width * mlp_ratio)), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------------


class UMTEncoder(nn.Module):
    """The UMT video ViT (see the module docstring).

    Args:
        width: token width (1024 for UMT-L).
        depth: the number of blocks built and run (23 for VideoChat-Flash: select layer -2 of 24).
        num_heads: attention heads (16 for UMT-L).
        mlp_ratio: MLP hidden width / width.
        patch_size: spatial patch size (tubelet size is 1).
        image_size: square input resolution (224 or 448 in the releases); a multiple of patch_size.
        frames_per_clip: frames of a clip (the clip position table covers this many frames).
        norm_eps: LayerNorm eps inside the blocks.
        final_norm_eps: eps of the final LayerNorm.

    ``forward(x)`` takes normalized pixels ``[clips, T, 3, H, W]`` with ``T == frames_per_clip``
    (clip table) or ``T == 1`` (image table), and returns ``[clips, T*L, width]`` with ``L`` the
    patches per frame, in (T, H, W) order.

    Set ``gradient_checkpointing = True`` to recompute every block in backward while training
    (``torch.utils.checkpoint`` with ``use_reentrant=False``).
    """

    def __init__(
        self,
        *,
        width: int = 1024,
        depth: int = 23,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        image_size: int = 224,
        frames_per_clip: int = 4,
        norm_eps: float = 1e-6,
        final_norm_eps: float = 1e-12,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if TABLE_IMAGE_SIZE % patch_size:
            raise ValueError(
                f"patch_size {patch_size} does not divide {TABLE_IMAGE_SIZE}, the resolution at which "
                "the position tables are defined"
            )
        if depth < 1 or frames_per_clip < 1:
            raise ValueError(f"depth ({depth}) and frames_per_clip ({frames_per_clip}) must be >= 1")
        self.width = width
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.patch_size = patch_size
        self.image_size = image_size
        self.frames_per_clip = frames_per_clip
        self.norm_eps = norm_eps
        self.final_norm_eps = final_norm_eps
        self.gradient_checkpointing = False

        self.patch_embed = PatchEmbed(width, patch_size)
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, norm_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=final_norm_eps)

        # The position tables are plain cached tensors, not buffers: they are not in the checkpoint,
        # and keeping them out of the module state keeps meta-device / ZeRO-3 construction and
        # HF loading free of special cases. Keyed by (frames, device, dtype).
        self._pos_cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

        self.apply(self._init_module)

    # -- bookkeeping --------------------------------------------------------------------------------

    @property
    def grid_size(self) -> int:
        """Patches per side of a frame (14 at 224 px, 28 at 448 px)."""
        return self.image_size // self.patch_size

    @property
    def patches_per_frame(self) -> int:
        """``L``: tokens per frame at the encoder output (196 at 224 px, 784 at 448 px)."""
        return self.grid_size**2

    def encoder_config(self) -> dict[str, Any]:
        """The constructor keyword arguments that rebuild this architecture."""
        return dict(
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            patch_size=self.patch_size,
            image_size=self.image_size,
            frames_per_clip=self.frames_per_clip,
            norm_eps=self.norm_eps,
            final_norm_eps=self.final_norm_eps,
        )

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        """Random init for training from scratch (pretrained weights overwrite it)."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, Attention):
            nn.init.zeros_(m.q_bias)
            nn.init.zeros_(m.v_bias)

    # -- position tables ----------------------------------------------------------------------------

    def position_table(self, frames: int) -> torch.Tensor:
        """The fixed table for a ``frames``-frame input, float32 CPU ``[frames*L, width]``.

        ``frames == 1`` gives the image table (over the 14x14 grid), ``frames_per_clip`` the clip
        table (over the flattened (T, 14, 14) grid); both resized per frame to this resolution.
        """
        if frames not in (1, self.frames_per_clip):
            raise ValueError(f"no position table for {frames} frames (only 1 or {self.frames_per_clip})")
        base = TABLE_IMAGE_SIZE // self.patch_size
        table = sinusoid_table(frames * base * base, self.width)
        return resize_table_per_frame(table, frames, base, self.grid_size)

    def _pos_embed(self, frames: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (frames, device, dtype)
        table = self._pos_cache.get(key)
        if table is None:
            table = self.position_table(frames).to(device=device, dtype=dtype)[None]
            self._pos_cache[key] = table
        return table

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode normalized pixels ``[clips, T, 3, H, W]`` -> ``[clips, T*L, width]``."""
        if x.dim() != 5 or x.shape[2] != 3:
            raise ValueError(f"UMTEncoder expects [clips, T, 3, H, W], got {tuple(x.shape)}")
        n, t, _, h, w = x.shape
        if t not in (1, self.frames_per_clip):
            raise ValueError(
                f"UMTEncoder takes T == 1 (images) or T == {self.frames_per_clip} (clips), got T == {t}"
            )
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"UMTEncoder was built for {self.image_size}x{self.image_size} input, got {h}x{w}")

        weight = self.patch_embed.proj.weight
        x = x.to(dtype=weight.dtype).permute(0, 2, 1, 3, 4)  # [clips, 3, T, H, W]
        x = self.patch_embed(x)  # [clips, T*L, width]
        x = x + self._pos_embed(t, x.device, x.dtype)

        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        return self.norm(x)

    # -- loading the released weights ---------------------------------------------------------------

    @classmethod
    def from_official(
        cls,
        path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
        image_size: int = 224,
        select_layer: int = -2,
        frames_per_clip: int = 4,
        num_heads: int | None = None,
        trust_pickle: bool = False,
    ) -> "UMTEncoder":
        """Build the encoder from the released ``UMT-L_f4_vision.pt`` (or its state dict).

        Args:
            path_or_state_dict: a path to the torch pickle, or the state dict itself. A flat dict
                whose encoder keys start with ``encoder.``; a dict nested under ``model`` or
                ``module`` is unwrapped. The final norm may be ``encoder.norm.*`` or
                ``encoder.vision_layernorm.*``. Keys outside ``encoder.`` are ignored.
            image_size: 224 or 448 (any multiple of the patch size works).
            select_layer: which block's output is used, Python-index style over the blocks in the
                file: -2 (VideoChat-Flash) builds ``blocks_present - 1`` blocks, -1 all of them,
                ``k >= 0`` the first ``k + 1``.
            frames_per_clip: frames of a clip.
            num_heads: attention heads; default ``width // 64`` (16 for UMT-L).
            trust_pickle: the file is unpickled without restriction (``weights_only=False``). Only for
                a file you trust: by default it is loaded as data, and a file that names other globals
                than tensors, plain containers and :data:`UMT_FILE_GLOBALS` is refused with
                :class:`~.safe_load.UnsafePickleError` naming them, before anything of it runs.

        Width, patch size, MLP ratio and the number of blocks present are read from the weights.
        Loading is strict over the blocks that are built: a missing or unexpected key raises
        :class:`UMTCheckpointError` naming the keys.
        """
        if isinstance(path_or_state_dict, (str, os.PathLike)):
            source = repr(os.fspath(path_or_state_dict))
        else:
            source = "the given state dict"
        enc = _encoder_state_dict(path_or_state_dict, source, trust_pickle)

        w = enc["patch_embed.proj.weight"]
        if w.dim() != 5 or w.shape[1] != 3 or w.shape[2] != 1 or w.shape[3] != w.shape[4]:
            raise UMTCheckpointError(
                f"{source}: encoder.patch_embed.proj.weight has shape {tuple(w.shape)}, expected "
                "[width, 3, 1, p, p] (Conv3d with tubelet size 1)"
            )
        width, patch_size = int(w.shape[0]), int(w.shape[-1])

        block_ids = {int(m.group(1)) for k in enc if (m := re.match(r"blocks\.(\d+)\.", k))}
        present = len(block_ids)
        if present == 0 or block_ids != set(range(present)):
            raise UMTCheckpointError(
                f"{source}: expected encoder.blocks.0 .. encoder.blocks.N-1, found block indices {sorted(block_ids)}"
            )
        depth = present + select_layer + 1 if select_layer < 0 else select_layer + 1
        if not 1 <= depth <= present:
            raise ValueError(f"select_layer={select_layer} is out of range for {present} blocks in {source}")

        fc1 = enc.get("blocks.0.mlp.fc1.weight")
        mlp_ratio = fc1.shape[0] / width if fc1 is not None else 4.0
        heads = num_heads if num_heads is not None else max(1, width // 64)

        # Blocks past the selected layer are deliberately not built; drop their weights.
        used = {
            k: v for k, v in enc.items()
            if not ((m := re.match(r"blocks\.(\d+)\.", k)) and int(m.group(1)) >= depth)
        }
        model = cls(
            width=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=mlp_ratio,
            patch_size=patch_size,
            image_size=image_size,
            frames_per_clip=frames_per_clip,
        )
        expected = set(model.state_dict().keys())
        missing = sorted(expected - used.keys())
        unexpected = sorted(used.keys() - expected)
        if missing or unexpected:
            lines = [f"{source} does not match the UMT encoder layout ({depth} of {present} blocks used):"]
            if missing:
                lines.append("  missing keys: " + ", ".join("encoder." + k for k in missing))
            if unexpected:
                lines.append("  unexpected keys: " + ", ".join("encoder." + k for k in unexpected))
            raise UMTCheckpointError("\n".join(lines))
        try:
            model.load_state_dict(used, strict=True)
        except RuntimeError as e:  # shape mismatches
            raise UMTCheckpointError(f"{source}: {e}") from e
        return model


#: What a UMT file may hold besides tensors and plain containers: the released
#: ``UMT-L_f4_vision.pt`` is a flat state dict; UMT's own training checkpoints add their arguments.
UMT_FILE_GLOBALS = (argparse.Namespace,)


def _encoder_state_dict(path_or_state_dict: Any, source: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load (if a path), unwrap, and return the encoder's tensors without the ``encoder.`` prefix."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"UMT checkpoint not found: {path!r}")
        sd = load_torch_file(path, allowed=UMT_FILE_GLOBALS, trust_pickle=trust_pickle,
                             opt_in="UMTEncoder.from_official(..., trust_pickle=True) "
                                    "(training config: model.vision.trust_pickle=true)")
    else:
        sd = path_or_state_dict

    if not isinstance(sd, Mapping):
        raise UMTCheckpointError(f"{source} is not a state dict (got {type(sd).__name__})")

    key = "encoder.patch_embed.proj.weight"
    for _ in range(3):  # unwrap {'model': {...}} / {'module': {...}} (possibly twice)
        if key in sd or ("module." + key) in sd:
            break
        inner = next((sd[k] for k in ("model", "module") if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    if key not in sd and ("module." + key) in sd:  # DDP-style prefixed keys
        sd = {k[len("module."):]: v for k, v in sd.items() if k.startswith("module.")}
    if key not in sd:
        sample = ", ".join(list(map(str, sd.keys()))[:5])
        raise UMTCheckpointError(
            f"{source} is not an official UMT encoder state dict: no '{key}' "
            f"({len(sd)} top-level keys, e.g. {sample or 'none'})"
        )

    enc = {k[len("encoder."):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith("encoder.")}
    for suffix in ("weight", "bias"):
        alias = f"vision_layernorm.{suffix}"
        if alias in enc:
            value = enc.pop(alias)
            enc.setdefault(f"norm.{suffix}", value)
    for k, v in enc.items():
        if not isinstance(v, torch.Tensor):
            raise UMTCheckpointError(f"{source}: encoder.{k} is a {type(v).__name__}, not a tensor")
    return enc
