"""Building the stage-1 model from parts, and converting released VideoChat-Flash checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from data_tools.convert_videochat_flash import ConversionError, convert
from tests.tiny_model import random_frames
from videoflash.model.configuration_videoflash import VideoFlashConfig
from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration
from videoflash.model.umt import UMTEncoder

WORDS = ["the", "a", "video", "shows", "red", "blue", "ball", "moves", "left", "right", "what", "colour", "is", "?"]


def qwen_like_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen2's ChatML special tokens and no <image> token, like the release."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + ["[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]", additional_special_tokens=specials[1:])


def tiny_text_config(vocab_size: int) -> Qwen2Config:
    return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512)


def official_umt_state_dict(blocks: int = 3, width: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    enc = UMTEncoder(width=width, depth=blocks, num_heads=1, image_size=224)
    for p in enc.parameters():  # non-trivial biases and norms, so a wrong mapping shows
        p.data.normal_(0, 0.05)
    return {f"encoder.{k}": v for k, v in enc.state_dict().items()}


def test_from_parts_loads_the_llm_and_the_umt_weights(tmp_path):
    tok = qwen_like_tokenizer()
    llm = AutoModelForCausalLM.from_config(tiny_text_config(vocab_size=len(tok)))
    llm.save_pretrained(tmp_path / "llm")
    umt = official_umt_state_dict(blocks=3)
    torch.save(umt, tmp_path / "UMT-L_f4_vision.pt")

    model = VideoFlashForConditionalGeneration.from_parts(
        str(tmp_path / "llm"), vision=tmp_path / "UMT-L_f4_vision.pt",
        vision_config=dict(image_size=224, num_heads=1), tokenizer=tok,
    )
    # <image> was added to the tokenizer and the LLM vocabulary grew by one row
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>") == len(WORDS) + 4
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # select layer -2: two of the three blocks in the file are built
    assert len(model.vision_tower.blocks) == 2
    assert torch.equal(model.vision_tower.blocks[1].attn.q_bias, umt["encoder.blocks.1.attn.q_bias"])
    assert torch.equal(model.vision_tower.norm.weight, umt["encoder.norm.weight"])
    ref = llm.state_dict()
    for key in ("model.layers.3.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(model.language_model.state_dict()[key], ref[key])
    assert torch.equal(model.get_input_embeddings().weight[: len(tok) - 1], ref["model.embed_tokens.weight"])
    assert model.connector.linear_1.weight.shape == (64, 64)

    ids = torch.tensor([[1, 5, model.config.image_token_id, 7, 8]])
    out = model(input_ids=ids, pixel_values_videos=random_frames(4, size=96))  # resized to 224 on the device
    assert out.logits.shape == (1, 4 + 64, len(tok))


def _write_videochat_flash_checkpoint(model: VideoFlashForConditionalGeneration, tok, path, extra_cfg=None):
    """Write ``model`` in the released layout (checkpoint_layouts.md), mapping written out here."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_tower.norm."):
            new = "model.vision_tower.vision_tower.encoder.vision_layernorm." + key[len("vision_tower.norm."):]
        elif key.startswith("vision_tower."):
            new = "model.vision_tower.vision_tower.encoder." + key[len("vision_tower."):]
        elif key.startswith("connector.linear_1."):
            new = "model.mm_projector.mlp.0." + key[len("connector.linear_1."):]
        elif key.startswith("connector.linear_2."):
            new = "model.mm_projector.mlp.2." + key[len("connector.linear_2."):]
        elif key.startswith("language_model.model."):
            new = "model." + key[len("language_model.model."):]
        else:
            assert key.startswith("language_model.lm_head."), key
            new = key[len("language_model."):]
        out[new] = value.contiguous()
    path.mkdir()
    save_file(out, str(path / "model.safetensors"))
    cfg = model.config.text_config.to_dict()
    cfg.update(architectures=["VideoChatFlashQwenForCausalLM"], model_type="videochat_flash_qwen",
               mm_vision_tower="umt-large", mm_hidden_size=64, mm_vision_select_layer=-2,
               mm_projector_type="tome16_mlp_hd64", mm_local_num_frames=4, mm_llm_compress=False,
               llm_compress_type="attention", llm_compress_layer_list=[24], llm_image_token_ratio_list=[1.0, 0.5])
    cfg.update(extra_cfg or {})
    (path / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(path)


def _released_like_model(**dropout):
    tok = qwen_like_tokenizer()
    torch.manual_seed(0)
    config = VideoFlashConfig(
        vision_config=dict(width=64, depth=2, num_heads=1, image_size=224),
        text_config=tiny_text_config(vocab_size=32).to_dict(),  # padded vocabulary, as Qwen2's
        tokens_per_clip=64, tokens_per_image=64, image_token_id=31, **dropout,
    )
    return VideoFlashForConditionalGeneration(config).eval(), tok


@pytest.mark.parametrize("compress", [False, True])
def test_converted_checkpoint_computes_the_same_logits(tmp_path, compress):
    dropout = {}
    extra = {"llm_compress_layer_list": [24]}
    if compress:  # the published inference opt-in, scaled to 4 layers
        dropout = dict(visual_dropout_layers=[1, 3], visual_dropout_keep_ratios=[0.75, 0.25],
                       visual_dropout_kinds=["uniform", "text"], visual_dropout_in_inference=True)
        extra = dict(mm_llm_compress=True, llm_compress_type="uniform0_attention",
                     llm_compress_layer_list=[1, 3], llm_image_token_ratio_list=[1, 0.75, 0.25])
    original, tok = _released_like_model(**dropout)
    src, out = tmp_path / "release", tmp_path / "converted"
    _write_videochat_flash_checkpoint(original, tok, src, extra if compress else {"llm_compress_layer_list": []})
    convert(src, out)
    loaded = VideoFlashForConditionalGeneration.from_pretrained(out).eval()
    if compress:
        assert loaded.config.visual_dropout_kinds == ["uniform", "text"]
        assert loaded.config.visual_dropout_keep_ratios == [0.75, 0.25]
        assert loaded.config.visual_dropout_in_inference
    new_id = loaded.config.image_token_id
    assert new_id == len(tok)  # <image> appended to the released vocabulary, inside the padded table
    frames = random_frames(8, size=224, seed=4)
    text = [1, 4, 5, 6, 7, 2, 1, 8, 9, 10]
    with torch.no_grad():
        a = original(input_ids=torch.tensor([text[:3] + [31] + text[3:]]), pixel_values_videos=frames).logits
        b = loaded(input_ids=torch.tensor([text[:3] + [new_id] + text[3:]]), pixel_values_videos=frames).logits
    assert a.shape == b.shape == (1, 10 + 2 * 64, 32) if not compress else a.shape == b.shape
    assert torch.allclose(a, b, atol=1e-5)


def test_conversion_errors_name_the_problem(tmp_path):
    original, tok = _released_like_model()
    src = tmp_path / "release"
    _write_videochat_flash_checkpoint(original, tok, src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["mm_hidden_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="mm_hidden_size"):
        convert(src, tmp_path / "out")
    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path / "nothing", tmp_path / "out2")


#: a Qwen2.5-style template whose default system turn is not the release's
QWEN25_LIKE_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_converted_release_is_asked_and_sampled_as_the_release(tmp_path):
    from tests.inference_helpers import write_mp4
    from videoflash.model.processing_videoflash import VideoFlashProcessor

    original, tok = _released_like_model()
    tok.chat_template = QWEN25_LIKE_TEMPLATE
    src, out = tmp_path / "release", tmp_path / "converted"
    release_cfg = {
        "llm_compress_layer_list": [], "image_aspect_ratio": "anyres_nopad", "image_grid_pinpoints": "(1x1),...,(2x3)",
        "auto_map": {"AutoConfig": "modeling_videochat_flash.VideoChatFlashQwenConfig",
                     "AutoModel": "modeling_videochat_flash.VideoChatFlashQwenForCausalLM"},
    }
    _write_videochat_flash_checkpoint(original, tok, src, release_cfg)
    # the release's tokenizer_config names no class of its own: AutoTokenizer would read config.json,
    # find remote code there and ask on the terminal; the conversion must not
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc.pop("tokenizer_class", None)
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    res = subprocess.run([sys.executable, "-m", "data_tools.convert_videochat_flash", str(src), str(out)],
                         stdin=subprocess.PIPE, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[y/N]" not in res.stdout + res.stderr and "custom code" not in res.stdout + res.stderr

    config = VideoFlashConfig.from_pretrained(out)
    proc = VideoFlashProcessor.from_directory(out, config=config)
    assert (proc.frame_policy, proc.min_frames, proc.max_frames, proc.image_size) == ("dynamic_fps1", 64, 512, 224)
    assert (proc.frame_rules, proc.resize, proc.multi_image, proc.image_mode) == ("videochat_flash", "exact", "pad", "anyres")
    # "(1x1),...,(2x3)": (i, j) for i (width) in 1..2, j (height) in 1..3, times the 224 px tile
    assert proc.grid_pinpoints == [[224, 224], [224, 448], [224, 672], [448, 224], [448, 448], [448, 672]]
    assert config.max_grid == 3  # training's tiling goes up to the largest side
    # the release's qwen_2 conversation (CHATML separator style), written out by hand
    video = write_mp4(tmp_path / "v.mp4", 80, fps=4, width=64, height=64)  # 20 s
    frames, meta = proc.load_video(str(video))
    assert frames.shape[0] == 64  # 20 s -> 20 frames by the rule, raised to the release's 64
    text = proc.render(proc.build_messages("what colour is the ball ?", time_msg=meta.time_message))
    time_msg = "The video lasts for 20.00 seconds, and 64 frames are uniformly sampled from it."
    system = "<|im_start|>system\nYou are a helpful assistant."
    expected = (system + "<|im_end|>" + "\n" + "<|im_start|>user" + "\n" + "<image>\n" + time_msg + " "
                + "what colour is the ball ?" + "<|im_end|>" + "\n" + "<|im_start|>assistant" + "\n")
    assert text == expected


def test_exporting_a_converted_release_keeps_its_processing(tmp_path):
    from videoflash.inference.export import export

    original, tok = _released_like_model()
    src, out = tmp_path / "release", tmp_path / "converted"
    _write_videochat_flash_checkpoint(original, tok, src, {"llm_compress_layer_list": []})
    convert(src, out)
    export(out, tmp_path / "hub", full_load_check=False, log=lambda *a: None)
    proc = json.loads((tmp_path / "hub" / "processor_config.json").read_text())
    assert (proc["frame_rules"], proc["resize"], proc["multi_image"]) == ("videochat_flash", "exact", "pad")
    assert (proc["min_frames"], proc["max_frames"], proc["system_prompt"]) == (64, 512, "You are a helpful assistant.")
