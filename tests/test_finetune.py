"""Fine-tuning (``stage=finetune``) with LoRA adapters: config rules, the merge, and two real runs of
2-rank DeepSpeed ZeRO-3 over gloo from a stage export.

Expectations: the adapted model's own forward (peft's layers) for the merge and the shipped
adapter; the starting weights, read back from the export, for what trained; the uninterrupted
run's losses for the resumed one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_model import IMAGE_TOKEN, random_frames, tiny_model
from videoflash.config import ConfigError, compose, validate
from videoflash.train import adapters

ALL_TARGETS = ["llm_attention", "llm_mlp", "connector", "vision_tower"]


def _adapted(targets=ALL_TARGETS, rank=4, alpha=8.0):
    model = tiny_model().eval()
    config = adapters.add_adapters(model, SimpleNamespace(rank=rank, alpha=alpha, dropout=0.0, targets=targets), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # B starts at zero; a trained adapter is not
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, config


def _inputs():
    ids = torch.randint(0, 190, (1, 9), generator=torch.Generator().manual_seed(2))
    ids[0, 2] = IMAGE_TOKEN
    return dict(input_ids=ids, pixel_values_videos=random_frames(8))


def test_adapters_sit_exactly_on_the_targeted_modules():
    model, _ = _adapted(["llm_attention", "connector"])
    adapted = sorted({n.split(".lora_")[0] for n, _ in model.named_parameters() if adapters.is_adapter_param(n)})
    expected = [f"language_model.model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("k_proj", "o_proj", "q_proj", "v_proj")]
    assert adapted == sorted(expected + ["connector.linear_1", "connector.linear_2"])


def test_merged_and_shipped_adapters_compute_the_adapted_logits(tmp_path):
    from peft import PeftModel

    model, config = _adapted()
    with torch.no_grad():
        want = model(**_inputs()).logits
    state = model.state_dict()
    plain = tiny_model(seed=7).eval()  # other weights, all overwritten
    assert plain.load_state_dict(adapters.merge_adapters(state, config.lora_alpha / config.r), strict=True)
    with torch.no_grad():
        assert torch.allclose(plain(**_inputs()).logits, want, atol=1e-5)
    base, adapter = adapters.split_adapters(state)
    adapters.save_adapter(tmp_path / "adapter", adapter, config)
    plain = tiny_model(seed=7).eval()
    plain.load_state_dict(base, strict=True)
    shipped = PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(shipped(**_inputs()).logits, want, atol=1e-6)


def test_finetune_config_rules(tmp_path):
    with pytest.raises(ConfigError, match="stage.init"):
        validate(compose(["stage=finetune", "stage.init=null"]))
    with pytest.raises(ConfigError, match="stage.adapter.targets"):
        validate(compose(["stage=finetune", f"stage.init={tmp_path}", "stage.trainable=[language_model]"]))
    with pytest.raises(ConfigError, match="stage.adapter.targets"):
        validate(compose(["stage=finetune", f"stage.init={tmp_path}", "stage.adapter.targets=[decoder]"]))
    cfg = validate(compose(["stage=finetune", f"stage.init={tmp_path}"]))
    assert (cfg.stage.id, cfg.stage.adapter.kind, cfg.stage.trainable) == (5, "lora", ["connector"])
    # full fine-tuning: no adapter, the parts listed train
    full = validate(compose(["stage=finetune", f"stage.init={tmp_path}", "stage.adapter.kind=none",
                             "stage.trainable=[connector,language_model]"]))
    assert full.stage.adapter.kind == "none"


def test_qlora_says_what_it_needs_on_a_cpu():
    with pytest.raises(adapters.AdapterError, match="CUDA"):
        adapters.quantization_config(torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------------------------------
# two real runs
# ---------------------------------------------------------------------------------------------------
def _starting_export(path: Path) -> Path:
    """A stage export of the tiny preset (configs/model/tiny.yaml) with the tiny tokenizer, plus the
    processor_config.json a converted release carries."""
    from videoflash.data.tokenizer import build_chatml_tokenizer
    from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration

    tok = build_chatml_tokenizer()
    text = dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
                vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = VideoFlashForConditionalGeneration.from_parts(
        text=text, vision_config=dict(width=64, depth=2, num_heads=4, patch_size=16, image_size=64, frames_per_clip=4),
        tokenizer=tok, tokens_per_clip=64, tokens_per_image=16, max_grid=2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"frame_rules": "videochat_flash", "min_frames": 8}))
    return path


def _losses(metrics: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r}


def _train(overrides, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "videoflash.train",
           *overrides]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_lora_finetune_on_zero3_trains_only_adapters_and_resumes_exactly(tmp_path, tiny_overrides, ds_env):
    from peft import PeftModel

    from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration

    init = _starting_export(tmp_path / "release")
    common = ["stage=finetune", f"stage.init={init}", "stage.adapter.rank=4", "stage.adapter.dropout=0.0",
              "stage.adapter.targets=[llm_attention,llm_mlp,vision_tower]", "stage.trainable=[connector]",
              "stage.lr=1e-2", "train.export_dtype=fp32", "train.keep_checkpoints=4"]
    # run A: 4 steps uninterrupted, checkpoints at 2 and 4, the adapter shipped beside the base
    run_a = tmp_path / "a"
    _train([*common, *tiny_overrides(run_a, steps=4, extra=["train.checkpoint_every=2", "stage.adapter.export=adapter"])],
           ds_env)
    # run B: another run root, resumed from A's step-2 checkpoint, the adapter merged at the end
    run_b = tmp_path / "b"
    ckpt = run_a / "stage5" / "checkpoints" / "step_00000002"
    _train([*common, *tiny_overrides(run_b, steps=4, extra=[f"resume={ckpt}"])], ds_env)

    ref, got = _losses(run_a / "stage5" / "metrics.jsonl"), _losses(run_b / "stage5" / "metrics.jsonl")
    assert sorted(ref) == [1, 2, 3, 4] and sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), f"step {step}"

    # what trained, read from A's export: the connector and the adapters; the rest is the start
    start = load_file(str(init / "model.safetensors"))
    base = load_file(str(run_a / "stage5" / "export" / "model.safetensors"))
    assert base.keys() == start.keys()
    for name, value in base.items():
        assert torch.equal(value, start[name]) != name.startswith("connector."), name
    shipped = load_file(str(run_a / "stage5" / "export" / "adapter" / "adapter_model.safetensors"))
    assert shipped and all(v.abs().sum() > 0 for k, v in shipped.items() if ".lora_B." in k)
    assert {k.split(".")[2] for k in shipped} == {"language_model", "vision_tower"}
    carried = json.loads((run_a / "stage5" / "export" / "processor_config.json").read_text())
    assert carried["frame_rules"] == "videochat_flash"

    # B's merged export (a plain checkpoint) computes what A's base + shipped adapter compute
    merged = VideoFlashForConditionalGeneration.from_pretrained(run_b / "stage5" / "export").eval()
    adapted = PeftModel.from_pretrained(
        VideoFlashForConditionalGeneration.from_pretrained(run_a / "stage5" / "export"),
        str(run_a / "stage5" / "export" / "adapter")).eval()
    image = merged.config.image_token_id
    ids = torch.tensor([[5, 6, image, 7, 8, 9]])
    frames = random_frames(8, size=64, seed=3)
    with torch.no_grad():
        a = adapted(input_ids=ids, pixel_values_videos=frames).logits
        b = merged(input_ids=ids, pixel_values_videos=frames).logits
    # merging rounds W + s*BA once in float32: logits of ~2 then differ by a few 1e-6, past 1e-5 on CI
    # (the gloo reduction order varies the trained adapter from run to run)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()

    # the hub export of A's stage export carries the shipped adapter along
    from videoflash.inference.export import export

    export(run_a / "stage5" / "export", tmp_path / "hub", full_load_check=False, log=lambda *a: None)
    assert (tmp_path / "hub" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_qlora_merge_takes_the_full_precision_base():
    """A 4-bit layer's packed weight and quantization state are replaced by the starting weight."""
    a, b = torch.randn(2, 6), torch.randn(4, 2)
    w = torch.randn(4, 6)
    state = {"m.q.base_layer.weight": torch.zeros(12, 1, dtype=torch.uint8),  # packed codes, another shape
             "m.q.base_layer.weight.absmax": torch.ones(3),
             "m.q.lora_A.default.weight": a, "m.q.lora_B.default.weight": b, "m.norm.weight": torch.ones(6)}
    merged = adapters.merge_adapters(state, 2.0, base={"m.q.weight": w, "m.norm.weight": torch.ones(6)})
    assert set(merged) == {"m.q.weight", "m.norm.weight"}
    expected = [[w[i, j].item() + 2.0 * sum(b[i, k].item() * a[k, j].item() for k in range(2)) for j in range(6)]
                for i in range(4)]
    assert torch.allclose(merged["m.q.weight"], torch.tensor(expected), atol=1e-6)
