"""The config tree: composition of every group and experiment, the published stage recipe, what a
user sees for `stage=3` and for a misspelt key, the DeepSpeed JSON, and the engine's pure pieces
(rank discovery, LR schedule, parameter groups, FLOPs, preemption flag)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from videoflash.config import CONFIG_DIR, ConfigError, check_paths, compose, normalize_overrides, validate

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("model", "data", "stage", "deepspeed", "logger", "launcher", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "videoflash.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


# -- composition ---------------------------------------------------------------------------------
def test_every_group_has_the_options_the_issue_lists():
    assert set(options("stage")) == {"stage1", "stage2", "stage3", "stage4", "finetune"}
    assert {"tiny", "umtl_qwen25_1p5b_448", "umtl_qwen2_7b_224"} <= set(options("model"))
    assert {"synthetic", "mix_template"} <= set(options("data"))
    assert {"zero3", "zero3_offload", "zero1"} <= set(options("deepspeed"))
    assert {"wandb", "none"} <= set(options("logger"))
    assert {"local", "slurm"} <= set(options("launcher"))
    assert "quickstart" in options("experiment")


@pytest.mark.parametrize("experiment", [None, *options("experiment")])
@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_every_stage_and_experiment_composes_and_validates(stage, experiment):
    overrides = [f"stage={stage}"] + ([f"experiment={experiment}"] if experiment else [])
    typed = validate(compose(overrides))
    assert typed.stage.id == stage


@pytest.mark.parametrize("group", ["model", "data", "deepspeed", "logger", "launcher"])
def test_every_option_of_every_group_composes_and_validates(group):
    for option in options(group):
        validate(compose([f"{group}={option}", "stage=2"]))


# -- the published recipe (videochat_flash.md §4) ------------------------------------------------
ALL = ["vision_tower", "connector", "language_model"]
RECIPE = {  # stage: (trainable, lr, encoder lr, min frames, max frames, max tokens, global batch)
    1: (["connector"], 1e-3, None, 4, 4, 8192, 512),
    2: (ALL, 1e-5, 2e-6, 4, 8, 32768, 256),
    3: (ALL, 1e-5, 2e-6, 64, 512, 32768, 256),
    4: (["vision_tower", "connector"], 1e-5, 2e-6, 64, 512, 32768, 256),
}


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_defaults_follow_the_published_recipe(stage):
    c = validate(compose([f"stage={stage}", "model=umtl_qwen2_7b_224"]))
    trainable, lr, vision_lr, fmin, fmax, tokens, batch = RECIPE[stage]
    s = c.stage
    assert sorted(s.trainable) == sorted(trainable)
    assert s.lr == pytest.approx(lr)
    if vision_lr is not None:
        assert s.vision_lr == pytest.approx(vision_lr)
    assert (s.frames.min_frames, s.frames.max_frames) == (fmin, fmax)
    assert s.max_tokens == tokens
    assert s.global_batch_size == batch
    assert s.warmup_ratio == pytest.approx(0.03) and s.lr_schedule == "cosine" and s.weight_decay == 0.0
    assert s.image_size == (448 if stage == 4 else 224)  # the 7B recipe: 224 px, stage 4 at 448 px
    assert s.init is None  # stage N starts from stage N-1's export (stage 1: from parts)
    assert c.train.activation_checkpointing and c.train.precision == "auto"
    assert s.frames.sampling == ("middle" if stage == 1 else "dynamic_fps1")


def test_the_2b_preset_is_448_px_from_stage_1():
    assert validate(compose(["stage=1", "model=umtl_qwen25_1p5b_448"])).stage.image_size == 448


# -- what users type -------------------------------------------------------------------------------
def test_stage_number_maps_to_the_group_option():
    assert normalize_overrides(["stage=3", "stage.lr=1e-4", "model=tiny"]) == ["stage=stage3", "stage.lr=1e-4", "model=tiny"]
    assert normalize_overrides(["stage=stage2"]) == ["stage=stage2"]


def test_cli_stage_3_selects_stage_3():
    out = cli("stage=3", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.stage.id == 3 and cfg.stage.name == "long_sft"
    assert cfg.stage.frames.min_frames == 64 and cfg.stage.frames.max_frames == 512


@pytest.mark.parametrize(
    "override, named",
    [
        ("stage.lrr=0.1", "lrr"),  # misspelt key
        ("stgae=3", "stgae"),  # misspelt top-level key
        ("stage.lr=abc", "stage.lr"),  # wrong type
        ("deepspeed.zero_stage=three", "deepspeed.zero_stage"),
        ("stage.trainable=[llm]", "stage.trainable"),  # a value the schema's type allows but validation does not
    ],
)
def test_a_bad_key_or_value_stops_before_any_work_naming_the_key(tmp_path, override, named):
    out = cli(override, f"run_root={tmp_path / 'run'}")
    assert out.returncode != 0
    assert named in out.stderr
    assert "shm_comm_op" not in out.stdout + out.stderr  # DeepSpeed never started
    assert "videoflash.train]" not in out.stdout + out.stderr  # nor the trainer
    assert not (tmp_path / "run").exists()  # and nothing was written


def test_validation_errors_name_their_key():
    cfg = compose(["stage=2"])
    cfg.stage.global_batch_size = 10
    cfg.stage.micro_batch_size = 4
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == "stage.global_batch_size"
    for key, value in (("decode_isolation", "thread"), ("decode_timeout_s", 0.0), ("video_backend", "opencv"),
                       ("synthetic.shape_scale", "[0.3,0.2]"), ("synthetic.shape_scale", "[0.1]"),
                       ("synthetic.long_fraction", "1.5")):  # fmt: skip
        cfg = compose(["stage=2", f"data.{key}={value}"], check=False)
        with pytest.raises(ConfigError) as err:
            validate(cfg)
        assert err.value.key == f"data.{key}"


def test_per_stage_resolver_picks_the_stage_value():
    q = [validate(compose(["experiment=quickstart", f"stage={s}"])) for s in (1, 2, 3, 4)]
    assert len({c.stage.max_steps for c in q}) > 1  # tuned per stage
    # the experiment spells out every stage's parts: stages 1-3 must stay those of their stage files
    published = [validate(compose([f"stage={s}"])).stage.trainable for s in (1, 2, 3, 4)]
    assert [c.stage.trainable for c in q[:3]] == published[:3]
    # the published stage 4 freezes the LLM; the quickstart's tiny LLM trains in it too (its experiment says why)
    assert published[3] == ["vision_tower", "connector"]
    assert q[3].stage.trainable == ["vision_tower", "connector", "language_model"]
    assert q[3].stage.image_size == q[3].model.hires_image_size > q[0].stage.image_size


# -- DeepSpeed JSON from typed fields ------------------------------------------------------------------
def test_deepspeed_json_is_rendered_from_typed_fields_and_accepted_by_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from videoflash.train.ds_config import render

    for option in ("zero3", "zero3_offload", "zero1"):
        c = validate(compose(["stage=2", f"deepspeed={option}"]))
        ds = render(c.deepspeed, global_batch=256, micro_batch=1, world_size=32, bf16=True, grad_clip=1.0)
        assert ds["train_batch_size"] == 256 and ds["gradient_accumulation_steps"] == 8  # 1 x 8 on 32 GPUs
        assert ds["bf16"]["enabled"] is True and "optimizer" not in ds
        zero = DeepSpeedZeroConfig(**ds["zero_optimization"])  # pydantic: unknown keys are rejected
        assert int(zero.stage) == c.deepspeed.zero_stage
    with pytest.raises(ValueError, match="global_batch_size"):
        render(c.deepspeed, global_batch=100, micro_batch=1, world_size=32, bf16=True, grad_clip=1.0)


# -- ranks from the environment ----------------------------------------------------------------------
def test_ranks_come_from_torchrun_then_srun_else_one_process():
    from videoflash.train.distributed import detect

    torchrun = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    assert (detect(torchrun).rank, detect(torchrun).local_rank, detect(torchrun).world_size) == (3, 1, 8)
    assert detect(torchrun).launcher == "torchrun"
    srun = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8"}
    d = detect(srun)
    assert (d.rank, d.local_rank, d.world_size, d.launcher) == (5, 1, 8, "slurm")
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "12"}  # sbatch's own shell
    assert detect(batch_script).launcher == "single" and detect(batch_script).world_size == 1
    assert detect({}).world_size == 1


def test_a_bare_run_becomes_one_process_per_gpu_and_on_cpu_only_when_asked():
    from videoflash.train.distributed import relaunch_count

    assert relaunch_count(None, gpus=0) == 1  # CPU: one process by default
    assert relaunch_count(2, gpus=0) == 2  # CPU: data-parallel ranks when asked (tests/test_resume.py runs it)
    assert relaunch_count(None, gpus=4) == 4 and relaunch_count(2, gpus=4) == 2
    with pytest.raises(RuntimeError, match="only 2 GPUs"):
        relaunch_count(4, gpus=2)


# -- LR schedule, parameter groups, freezing ----------------------------------------------------------
def test_cosine_schedule_with_three_percent_warm_up():
    from videoflash.train.stages import lr_lambda, warmup_steps

    total = 1000
    f = lr_lambda(total, 0.03, "cosine")
    assert warmup_steps(total, 0.03) == 30
    assert f(0) == pytest.approx(1 / 30) and f(29) == pytest.approx(1.0)
    assert f(30) == pytest.approx(1.0)
    assert f(30 + 485) == pytest.approx(0.5, abs=1e-3)  # half-way through the decay
    assert f(999) == pytest.approx(0.5 * (1 + math.cos(math.pi * 969 / 970)))
    assert all(f(s) >= f(s + 1) for s in range(30, 999))


def _tiny_model():
    from videoflash.model.configuration_videoflash import VideoFlashConfig
    from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration

    text = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64)
    cfg = VideoFlashConfig(vision_config=dict(width=32, depth=1, num_heads=4, image_size=32, patch_size=16),
                           text_config=text, tokens_per_clip=8, tokens_per_image=8, image_token_id=63)
    return VideoFlashForConditionalGeneration(cfg)


@pytest.mark.parametrize("stage", [1, 2, 4])
def test_freezing_and_per_module_learning_rates(stage):
    from videoflash.train.stages import apply_trainable, param_groups

    s = validate(compose([f"stage={stage}"])).stage
    model = _tiny_model()
    counts = apply_trainable(model, s.trainable)
    by_part = {p: sum(x.numel() for n, x in model.named_parameters() if n.startswith(p + ".")) for p in counts}
    for part, c in counts.items():
        assert c["total"] == by_part[part]
        assert c["trainable"] == (by_part[part] if part in s.trainable else 0)
    groups = param_groups(model, s)
    expected_lr = {"vision_tower": s.vision_lr or s.lr, "connector": s.connector_lr or s.lr, "language_model": s.lr}
    assert {g["name"] for g in groups} == set(s.trainable)
    for g in groups:
        assert g["lr"] == pytest.approx(expected_lr[g["name"]])
        assert all(p.requires_grad for p in g["params"])
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(by_part[p] for p in s.trainable)


# -- model FLOPs against torch's own FLOP counter -------------------------------------------------------
# torch's FlopCounterMode has no formula for the fused CPU attention kernel that
# scaled_dot_product_attention picks (torch 2.14: aten._scaled_dot_product_flash_attention_for_cpu),
# so its attention FLOPs would silently count as 0. Under the MATH backend SDPA decomposes into
# bmm/matmul, which the counter does count: the comparison is then against every matmul the model runs.
def test_analytic_flops_match_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from videoflash.train.flops import FlopsModel

    model = _tiny_model().eval()
    fm = FlopsModel.from_config(model.config, trainable=[])
    frames = torch.randint(0, 255, (4, 32, 32, 3), dtype=torch.uint8)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        model.vision_tower(model._normalize(frames).reshape(1, 4, 3, 32, 32))
    assert fm.encoder_forward(4) == pytest.approx(fc.get_total_flops(), rel=0.02)
    # the attention part on its own, by hand: QK^T and AV, 2 * P^2 * w each, per block
    v = model.config.vision_config
    patches = 4 * (v["image_size"] // v["patch_size"]) ** 2
    counted = {str(k): n for k, n in fc.get_flop_counts()["Global"].items()}
    assert counted.get("aten.bmm", 0) == v["depth"] * 4 * patches**2 * v["width"]

    n = 40
    ids = torch.randint(0, 60, (1, n))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        model.language_model(input_ids=ids)
    # torch counts full (non-causal) attention; the analytic count halves it for causal masking
    L, h = model.config.text_config.num_hidden_layers, model.config.text_config.hidden_size
    assert fm.llm_forward(n) + 2 * L * n * n * h == pytest.approx(fc.get_total_flops(), rel=0.02)

    # with labels the model runs the output head on the supervised tokens only (the targets of the
    # shifted loss: labels[:, 1:]), so the head counts 6 rows, not 40
    labels = torch.full_like(ids, -100)
    labels[0, -6:] = ids[0, -6:]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        model(input_ids=ids, labels=labels)
    assert fm.supervised_tokens({"labels": labels}) == 6
    head = fc.get_flop_counts()["VideoFlashForConditionalGeneration.lm_loss"]  # the loss head's own module
    assert sum(head.values()) == fm.head_forward(6)  # the logits of 6 rows
    assert fm.llm_forward(n, head_rows=6) + 2 * L * n * n * h == pytest.approx(fc.get_total_flops(), rel=0.02)
    assert fm.llm_forward(n) - fm.llm_forward(n, head_rows=6) == 2 * (n - 6) * h * model.config.text_config.vocab_size


def test_training_flops_count_backward_only_where_gradients_flow():
    from videoflash.train.flops import FlopsModel

    model = _tiny_model()
    batch = {"video_frame_counts": torch.tensor([4, 8]), "image_tile_counts": torch.tensor([0, 0]),
             "num_text_tokens": torch.tensor([20, 30]), "num_visual_tokens": torch.tensor([8, 16])}
    fwd = FlopsModel.from_config(model.config, [])
    f1 = FlopsModel.from_config(model.config, ["connector"]).batch(batch)
    f2 = FlopsModel.from_config(model.config, ALL).batch(batch)
    enc = 3 * fwd.encoder_forward(4)
    llm = fwd.llm_forward(28) + fwd.llm_forward(46)
    assert f1["vision"] == pytest.approx(enc)  # frozen encoder, nothing before it trains: forward only
    assert f1["llm"] == pytest.approx(2 * llm)  # frozen LLM with a trainable connector below: fwd + input grads
    assert f2["vision"] == pytest.approx(3 * enc) and f2["llm"] == pytest.approx(3 * llm)
    # with labels (training) the head counts the supervised tokens only: 5 + 3 targets; each
    # sample's first token is never a target (the shifted loss; in a packed row, each sample's own)
    labels = torch.full((2, 40), -100)
    labels[0, :6], labels[1, 10:13] = 1, 1
    head = 2 * fwd.hidden * fwd.vocab
    f3 = FlopsModel.from_config(model.config, ALL).batch({**batch, "labels": labels})
    assert f3["llm"] == pytest.approx(3 * (llm - head * (28 + 46 - 8)))
    packed = {**batch, "labels": labels.view(1, 80), "sample_lengths": torch.tensor([[10, 30]])}
    labels[0, 10] = 1  # the second sample's first token: ignored in a packed row
    assert FlopsModel.supervised_tokens(packed) == 8


# -- preemption flag -----------------------------------------------------------------------------------
def test_a_signal_sets_the_stop_flag():
    from videoflash.train.preemption import Preemption

    p = Preemption(["SIGUSR1"], torch.device("cpu"))
    try:
        assert not p.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.should_stop()
    finally:
        p.restore()


# -- the files a run starts from (checked before any model is built) --------------------------------
def _hf_dir(path: Path, shards: int = 1) -> Path:
    """A minimal HF model directory: config.json and safetensors weights (sharded with an index)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "videoflash"}')
    if shards == 1:
        save_file({"w": torch.arange(64.0)}, str(path / "model.safetensors"))
    else:
        names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        for i, name in enumerate(names):
            save_file({f"w{i}": torch.arange(64.0)}, str(path / name))
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {f"w{i}": n for i, n in enumerate(names)}}))
    return path


def _paths_error(tmp_path, *overrides: str) -> ConfigError | None:
    typed = validate(compose(["model=tiny", f"run_root={tmp_path / 'run'}", *overrides]))
    try:
        check_paths(typed)
    except ConfigError as err:
        return err
    return None


def test_a_whole_start_passes_the_path_checks(tmp_path):
    good = _hf_dir(tmp_path / "export", shards=2)
    ckpt = tmp_path / "step_00000004"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    assert _paths_error(tmp_path, "stage=2", f"stage.init={good}", f"resume={ckpt}") is None


def _truncated(path: Path, keep: float = 0.5) -> Path:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return path


def _damaged_init(tmp_path: Path, damage: str) -> Path:
    """An HF directory with one damaged file: the path that must be named."""
    d = _hf_dir(tmp_path / "export", shards=2 if damage == "missing-shard" else 1)
    if damage == "truncated-shard":
        return _truncated(d / "model.safetensors", 0.9)
    if damage == "missing-shard":
        (d / "model-00002-of-00002.safetensors").unlink()
        return d / "model-00002-of-00002.safetensors"
    (d / "config.json").write_text('{"model_type": "videofl')
    return d / "config.json"


def _umt_truncated(tmp_path: Path) -> Path:
    torch.save({"encoder.w": torch.zeros(1000)}, tmp_path / "umt.pt")
    return _truncated(tmp_path / "umt.pt")


# case: (key, what the message says, a function of tmp_path giving (overrides, the path to name))
PATH_CASES = {
    "resume-missing": ("resume", "no such checkpoint directory", lambda t: (["stage=2", f"resume={t / 'x'}"], t / "x")),
    "resume-not-a-checkpoint": ("resume", "no trainer_state.json", lambda t: (["stage=2", f"resume={t}"], t)),
    "init-missing": ("stage.init", "is not a directory", lambda t: (["stage=2", f"stage.init={t / 'x'}"], t / "x")),
    **{f"init-{damage}": ("stage.init", said, lambda t, damage=damage: (["stage=2", f"stage.init={t / 'export'}"],
                                                                        _damaged_init(t, damage)))
       for damage, said in [("truncated-shard", "its safetensors header says"),
                            ("missing-shard", "listed in model.safetensors.index.json, is missing"),
                            ("garbled-config", "is not valid JSON")]},
    "vision-missing": ("model.vision.pretrained", "no such file",
                       lambda t: (["stage=1", f"model.vision.pretrained={t / 'x.pt'}"], t / "x.pt")),
    "vision-truncated": ("model.vision.pretrained", "is truncated or damaged",
                         lambda t: (["stage=1", f"model.vision.pretrained={_umt_truncated(t)}"], t / "umt.pt")),
    "text-missing": ("model.text.pretrained", "no such directory",
                     lambda t: (["stage=1", f"model.text.pretrained={t / 'x'}"], t / "x")),
    "text-offline-not-cached": ("model.text.pretrained", "not in the local cache",
                                lambda t: (["stage=1", "model.text.pretrained=videoflash-tests/no-such-model"],
                                           "videoflash-tests/no-such-model")),
}


@pytest.mark.parametrize("case", sorted(PATH_CASES))
def test_a_missing_or_damaged_start_names_the_key_and_the_path(tmp_path, monkeypatch, case):
    key, said, make = PATH_CASES[case]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides, where = make(tmp_path)
    err = _paths_error(tmp_path, *overrides)
    assert err is not None and err.key == key
    assert said in str(err) and str(where) in str(err), str(err)


def test_pretrained_parts_are_not_needed_once_the_start_is_built(tmp_path):
    """A resumed stage 1 has its from-parts starting point already: the parts may be gone."""
    (tmp_path / "run" / "stage1" / "init").mkdir(parents=True)
    (tmp_path / "run" / "stage1" / "init" / "config.json").write_text("{}")
    assert _paths_error(tmp_path, "stage=1", f"model.vision.pretrained={tmp_path / 'gone.pt'}") is None


@pytest.mark.parametrize("override", ["stage.init", "resume"])
def test_the_cli_stops_on_a_missing_start_before_any_work(tmp_path, override):
    missing = tmp_path / "nowhere"
    out = cli("stage=2", "model=tiny", f"{override}={missing}", f"run_root={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"config error: {override}: {missing}" in out.stderr
    assert "shm_comm_op" not in out.stdout + out.stderr and not (tmp_path / "run").exists()


def test_quickstart_keeps_a_corpus_made_before_the_newer_corpus_options(tmp_path):
    """A corpus whose meta.json predates train_questions / shape_scale / long_fraction was made with
    their defaults ("one", [0.17, 0.17], 0.125): asked for those, the quickstart keeps it."""
    from videoflash.quickstart import make_corpus

    cfg = compose(["experiment=quickstart", "stage=2", f"data.root={tmp_path}", "data.synthetic.num_train=4",
                   "data.synthetic.num_heldout=2", "data.synthetic.train_questions=one",
                   "data.synthetic.long_fraction=0.125"])
    (tmp_path / "meta.json").write_text(json.dumps({"config": {"num_train": 4, "num_heldout": 2, "seed": 0}}))
    (tmp_path / "heldout.jsonl").write_text("marker\n")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-index.json").write_text("{}")
    make_corpus(cfg)
    assert (tmp_path / "heldout.jsonl").read_text() == "marker\n"  # not generated anew
