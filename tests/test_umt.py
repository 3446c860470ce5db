"""UMTEncoder against an explicit reference forward written here from the published description.

The reference consumes the official-layout state dict directly (keys ``encoder.*``), computes the
sinusoid tables with plain Python loops, resizes them for 448 px with a hand-written bicubic kernel,
and runs the blocks with explicit matmuls, LayerNorm and softmax in float64. Nothing in it calls
videoflash code.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from videoflash.model.safe_load import CorruptFileError, UnsafePickleError
from videoflash.model.umt import UMTCheckpointError, UMTEncoder

from tests.crafted_pickle import save_with_payload

WIDTH, HEADS, BLOCKS_IN_FILE, MLP, PATCH = 64, 4, 3, 256, 16


# --------------------------------------------------------------------------------------------------
# A random official-layout state dict (shapes as in checkpoint_layouts.md, scaled down)
# --------------------------------------------------------------------------------------------------


def make_official_sd(seed: int = 0, final_norm: str = "norm") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.1, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd = {
        "encoder.patch_embed.proj.weight": rnd(WIDTH, 3, 1, PATCH, PATCH, std=0.03),
        "encoder.patch_embed.proj.bias": rnd(WIDTH),
    }
    for i in range(BLOCKS_IN_FILE):
        p = f"encoder.blocks.{i}."
        sd |= {
            p + "norm1.weight": rnd(WIDTH, mean=1.0),
            p + "norm1.bias": rnd(WIDTH),
            p + "attn.qkv.weight": rnd(3 * WIDTH, WIDTH, std=0.15),
            p + "attn.q_bias": rnd(WIDTH),
            p + "attn.v_bias": rnd(WIDTH),
            p + "attn.proj.weight": rnd(WIDTH, WIDTH),
            p + "attn.proj.bias": rnd(WIDTH),
            p + "norm2.weight": rnd(WIDTH, mean=1.0),
            p + "norm2.bias": rnd(WIDTH),
            p + "mlp.fc1.weight": rnd(MLP, WIDTH),
            p + "mlp.fc1.bias": rnd(MLP),
            p + "mlp.fc2.weight": rnd(WIDTH, MLP),
            p + "mlp.fc2.bias": rnd(WIDTH),
        }
    sd[f"encoder.{final_norm}.weight"] = rnd(WIDTH, mean=1.0)
    sd[f"encoder.{final_norm}.bias"] = rnd(WIDTH)
    # keys of other parts of the released file (not the encoder) must be ignored
    sd["clip_decoder.0.head.weight"] = rnd(8, WIDTH)
    return sd


# --------------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------------


def ref_sinusoid(n: int, d: int) -> np.ndarray:
    """Position p, channel j: angle p / 10000^(2*(j//2)/d); sin on even j, cos on odd j."""
    out = np.zeros((n, d))
    for p in range(n):
        for j in range(d):
            angle = p / (10000.0 ** (2 * (j // 2) / d))
            out[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return out


def ref_bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """1-D bicubic resampling matrix [n_out, n_in], align_corners=False, edge indices clamped.

    Keys' cubic convolution kernel with a = -0.75: for |t| <= 1, (a+2)|t|^3 - (a+3)|t|^2 + 1;
    for 1 < |t| < 2, a|t|^3 - 5a|t|^2 + 8a|t| - 4a. Output pixel i samples the input at
    (i + 0.5) * n_in / n_out - 0.5.
    """

    def kernel(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            m[i, min(max(k, 0), n_in - 1)] += kernel(src - k)
    return m


def ref_table(frames: int, image_size: int) -> np.ndarray:
    """[frames*g*g, WIDTH]: the 14x14 (per frame) table, each frame resized to g x g if needed."""
    g0, g = 224 // PATCH, image_size // PATCH
    table = ref_sinusoid(frames * g0 * g0, WIDTH).reshape(frames, g0, g0, WIDTH)
    if g != g0:
        m = ref_bicubic_matrix(g0, g)
        table = np.einsum("ia,jb,tabc->tijc", m, m, table)  # separable 2-D bicubic, frame by frame
    return table.reshape(frames * g * g, WIDTH)


def ref_layernorm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def ref_forward(sd: dict, x: torch.Tensor, image_size: int, depth: int, final_norm: str = "norm") -> torch.Tensor:
    """Explicit UMT forward in float64: x [n, T, 3, H, W] -> [n, T*L, WIDTH]."""
    s = {k: v.double() for k, v in sd.items()}
    x = x.double()
    n, t, _, h, w = x.shape
    gh, gw = h // PATCH, w // PATCH
    # patchify: token (t, i, j) is frame t's patch at row i, column j, channels (c, dy, dx)
    patches = x.reshape(n, t, 3, gh, PATCH, gw, PATCH).permute(0, 1, 3, 5, 2, 4, 6).reshape(n, t * gh * gw, -1)
    wpe = s["encoder.patch_embed.proj.weight"].reshape(WIDTH, -1)
    z = patches @ wpe.T + s["encoder.patch_embed.proj.bias"]
    z = z + torch.from_numpy(ref_table(t, image_size))

    hd = WIDTH // HEADS
    for i in range(depth):
        p = f"encoder.blocks.{i}."
        y = ref_layernorm(z, s[p + "norm1.weight"], s[p + "norm1.bias"], 1e-6)
        bias = torch.cat([s[p + "attn.q_bias"], torch.zeros(WIDTH, dtype=torch.float64), s[p + "attn.v_bias"]])
        qkv = y @ s[p + "attn.qkv.weight"].T + bias
        q, k, v = qkv[..., :WIDTH], qkv[..., WIDTH : 2 * WIDTH], qkv[..., 2 * WIDTH :]
        heads_out = []
        for hh in range(HEADS):
            sl = slice(hh * hd, (hh + 1) * hd)
            scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(hd)
            e = torch.exp(scores - scores.max(-1, keepdim=True).values)
            heads_out.append((e / e.sum(-1, keepdim=True)) @ v[..., sl])
        attn = torch.cat(heads_out, -1) @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
        z = z + attn
        y = ref_layernorm(z, s[p + "norm2.weight"], s[p + "norm2.bias"], 1e-6)
        y = y @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"]
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))  # exact GELU
        z = z + y @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
    return ref_layernorm(z, s[f"encoder.{final_norm}.weight"], s[f"encoder.{final_norm}.bias"], 1e-12)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd():
    return make_official_sd()


def _compare(model, sd, x, image_size):
    with torch.no_grad():
        got = model(x.float())
    want = ref_forward(sd, x, image_size, depth=BLOCKS_IN_FILE - 1)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("image_size,clips,frames", [(224, 2, 4), (224, 3, 1), (448, 1, 4), (448, 2, 1)])
def test_forward_matches_reference(sd, image_size, clips, frames):
    model = UMTEncoder.from_official(sd, image_size=image_size, num_heads=HEADS)
    x = torch.randn(clips, frames, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    L = (image_size // PATCH) ** 2
    assert model.patches_per_frame == L
    _compare(model, sd, x, image_size)


def test_position_tables_match_reference():
    model = UMTEncoder(width=WIDTH, depth=1, num_heads=HEADS, image_size=448)
    for frames in (1, 4):
        want = torch.from_numpy(ref_table(frames, 448))
        torch.testing.assert_close(model.position_table(frames).double(), want, atol=1e-5, rtol=0)
    # the clip table is per frame: frame 0's 28x28 slice of the clip table is the image table
    clip, image = model.position_table(4), model.position_table(1)
    torch.testing.assert_close(clip[:784], image)


def test_structure_and_names(sd):
    model = UMTEncoder.from_official(sd, num_heads=HEADS)
    assert len(model.blocks) == BLOCKS_IN_FILE - 1  # select_layer=-2: the last block is not built
    assert model.width == WIDTH and model.num_heads == HEADS and model.mlp_ratio == MLP / WIDTH
    want = {k[len("encoder."):] for k in sd if k.startswith("encoder.") and not k.startswith(f"encoder.blocks.{BLOCKS_IN_FILE - 1}.")}
    assert set(model.state_dict()) == want
    assert not list(model.buffers())  # position tables are not state
    # weights really came from the dict
    torch.testing.assert_close(model.blocks[1].attn.v_bias, sd["encoder.blocks.1.attn.v_bias"])
    # select_layer=-1 builds every block; the default head count is width // 64
    full = UMTEncoder.from_official(sd, select_layer=-1)
    assert len(full.blocks) == BLOCKS_IN_FILE and full.num_heads == 1


def test_from_path_and_nested(sd, tmp_path):
    path = tmp_path / "UMT-L_f4_vision.pt"
    torch.save(sd, path)
    nested = tmp_path / "nested.pt"
    torch.save({"model": sd}, nested)
    x = torch.randn(1, 4, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    for p in (path, str(nested)):
        _compare(UMTEncoder.from_official(p, num_heads=HEADS), sd, x, 224)


def test_vision_layernorm_alias(sd):
    aliased = {k.replace("encoder.norm.", "encoder.vision_layernorm."): v for k, v in sd.items()}
    assert "encoder.vision_layernorm.weight" in aliased and "encoder.norm.weight" not in aliased
    model = UMTEncoder.from_official(aliased, num_heads=HEADS)
    torch.testing.assert_close(model.norm.weight, sd["encoder.norm.weight"])
    x = torch.randn(2, 1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    _compare(model, sd, x, 224)


def test_clear_errors(sd, tmp_path):
    broken = dict(sd)
    del broken["encoder.blocks.1.attn.q_bias"]
    with pytest.raises(UMTCheckpointError, match=r"missing keys: encoder\.blocks\.1\.attn\.q_bias"):
        UMTEncoder.from_official(broken, num_heads=HEADS)

    extra = dict(sd)
    extra["encoder.blocks.0.attn.k_bias"] = torch.zeros(WIDTH)
    with pytest.raises(UMTCheckpointError, match=r"unexpected keys: encoder\.blocks\.0\.attn\.k_bias"):
        UMTEncoder.from_official(extra, num_heads=HEADS)

    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        UMTEncoder.from_official(missing)

    other = tmp_path / "other.pt"
    torch.save({"vision.weight": torch.zeros(3)}, other)
    with pytest.raises(UMTCheckpointError, match="other.pt.*not an official UMT"):
        UMTEncoder.from_official(other)


def test_input_checks():
    model = UMTEncoder(width=WIDTH, depth=1, num_heads=HEADS)
    with pytest.raises(ValueError, match="T == 1"):
        model(torch.zeros(1, 2, 3, 224, 224))
    with pytest.raises(ValueError, match="224x224"):
        model(torch.zeros(1, 1, 3, 112, 112))


def test_gradient_checkpointing_same_gradients(sd):
    x = torch.randn(2, 1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    grads = []
    for ckpt in (False, True):
        model = UMTEncoder.from_official(sd, num_heads=HEADS).train()
        model.gradient_checkpointing = ckpt
        model(x).square().mean().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_crafted_pickle_does_not_run(sd, tmp_path, legacy):
    """A weights file whose pickle would create a file is refused, naming the file and the global,
    and nothing of it runs; with the explicit opt-in it loads (and its code runs, as promised)."""
    marker = tmp_path / "marker"
    path = save_with_payload(sd, tmp_path / "UMT-L_f4_vision.pt", marker, legacy=legacy)
    with pytest.raises(UnsafePickleError, match=r"UMT-L_f4_vision\.pt: refusing to unpickle (io|builtins)\.open.*trust_pickle"):
        UMTEncoder.from_official(path, num_heads=HEADS)
    assert not marker.exists()
    model = UMTEncoder.from_official(path, num_heads=HEADS, trust_pickle=True)
    assert marker.exists()
    torch.testing.assert_close(model.blocks[0].attn.q_bias, sd["encoder.blocks.0.attn.q_bias"])


def test_training_checkpoint_with_args_loads_as_data(sd, tmp_path):
    """UMT's training checkpoints store their argparse arguments beside the weights: allowed."""
    path = tmp_path / "umt_train.pt"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3, model="umt_large")}, path)
    model = UMTEncoder.from_official(path, num_heads=HEADS)
    torch.testing.assert_close(model.norm.weight, sd["encoder.norm.weight"])


def test_truncated_file_is_named(sd, tmp_path):
    path = tmp_path / "UMT-L_f4_vision.pt"
    torch.save(sd, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match=r"UMT-L_f4_vision\.pt is not a complete torch file"):
        UMTEncoder.from_official(path, num_heads=HEADS)
