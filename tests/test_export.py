"""``python -m videoflash.export``: the HF repo it writes, loading it in a clean environment without
videoflash, and the upload path.

The clean environment: a new virtual environment (``python -m venv --without-pip``, no system site
packages) that sees exactly the installed distributions of torch, transformers, timm and decord2 and
their runtime dependencies -- their import packages and ``.dist-info`` folders are symlinked into one
directory put on the venv's path by a ``.pth`` file. videoflash (installed editable here), PyAV and
everything else is invisible; the subprocess runs outside the repository with ``HF_HUB_OFFLINE=1``
and asserts that ``import videoflash`` fails. Building it takes a second, where pip-installing torch
would take minutes and gigabytes (and needs the network).

No hub is reachable here: the upload is tested against :class:`RecordingHubApi`, a stand-in for
``huggingface_hub.HfApi`` that records the calls and checks the folder at upload time, and the
failure path against the real ``HfApi`` under ``HF_HUB_OFFLINE=1`` (which refuses to connect).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
import torch
import yaml

from tests.inference_helpers import (
    make_run_dir,
    model_package_files,
    tiny_chat_model,
    tiny_tokenizer,
    write_mp4,
)
from videoflash.data.decode import VideoDecoder
from videoflash.inference.export import AUTO_MAP, check_model_package, main
from videoflash.inference.hub import HubPublisher
from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
CLEAN_ENV_ROOTS = ["torch", "transformers", "timm", "decord2"]


# --------------------------------------------------------------------------------------------------
# fixtures: a run directory and its export
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    model = tiny_chat_model(tok, seed=11)
    return make_run_dir(tmp_path_factory.mktemp("runs"), model, tok)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, run_dir):
    """The CLI, as a user runs it, on the run root (stage 3 is the latest export)."""
    out = tmp_path_factory.mktemp("export") / "tiny-videoflash"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("modules"))}
    res = subprocess.run([sys.executable, "-m", "videoflash.export", str(run_dir), str(out), "--max-shard-size", "300KB"],
                         capture_output=True, text=True, env=env, cwd=out.parent, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "checks passed" in res.stdout and "AutoModel (weights equal)" in res.stdout
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """60 frames at 4 fps (15 s): the stage-3 policy (dynamic_fps1, 8..24) takes 12 frames."""
    return write_mp4(tmp_path_factory.mktemp("media") / "clip.mp4", 60, fps=4)


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


# --------------------------------------------------------------------------------------------------
# the layout
# --------------------------------------------------------------------------------------------------


def test_export_layout(exported, run_dir, tok):
    files = {p.name for p in exported.iterdir()}
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["model_type"] == "videoflash" and cfg["architectures"] == ["VideoFlashForConditionalGeneration"]
    assert cfg["auto_map"] == {
        "AutoConfig": "configuration_videoflash.VideoFlashConfig",
        "AutoModel": "modeling_videoflash.VideoFlashForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_videoflash.VideoFlashForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_videoflash.VideoFlashForConditionalGeneration",
        "AutoProcessor": "processing_videoflash.VideoFlashProcessor",
    }
    # the model's own code, every file, byte for byte
    for path in model_package_files():
        assert (exported / path.name).read_bytes() == path.read_bytes(), path.name
    # sharded safetensors: the index lists every shard, and every shard is there
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards == sorted(f for f in files if f.endswith(".safetensors"))
    assert all(os.path.getsize(exported / s) <= 400_000 for s in shards)
    # tokenizer with its chat template, processor with the stage's frame policy
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
            "generation_config.json", "README.md"} <= files
    assert "<|im_start|>" in (exported / "chat_template.jinja").read_text()
    proc = json.loads((exported / "processor_config.json").read_text())
    assert proc["auto_map"] == {"AutoProcessor": "processing_videoflash.VideoFlashProcessor"}
    assert (proc["frame_policy"], proc["min_frames"], proc["max_frames"]) == ("dynamic_fps1", 8, 24)  # stage 3's
    assert (proc["image_size"], proc["tokens_per_frame"], proc["frames_per_clip"]) == (64, 4, 4)
    assert proc["image_mean"] == [0.485, 0.456, 0.406] and proc["image_std"] == [0.229, 0.224, 0.225]
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["do_sample"] is False and gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert gen["pad_token_id"] == tok.pad_token_id
    assert not (exported.parent / "tiny-videoflash.partial").exists()


def test_model_card_reports_the_run(exported):
    readme = (exported / "README.md").read_text()
    meta = _front_matter(readme)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "video-text-to-text"
    assert meta["base_model"] == "Qwen/Qwen2-0.5B-Instruct" and "videoflash" in meta["tags"]
    body = readme.split("---\n", 2)[2]
    assert "stage 3 (long_sft)" in body
    assert "trust_remote_code=True" in body and "revision=revision" in body
    # the data mix with its shares (weights 3 and 1)
    assert "| synthetic_short | `data/short-{000000..000003}.tar` | 3 | 75.0% |" in body
    assert "| synthetic_long | `data/long-{000000..000001}.tar` | 1 | 25.0% |" in body
    # the recipe and measured results from the run files (the resumed step 2 counted once)
    assert "| lr | 1e-05 |" in body and "| vision_lr | 2e-06 |" in body and "dynamic_fps1 8..24" in body
    assert "4 steps, 32 samples" in body and "loss 6.5 -> 4.25" in body
    assert "| heldout/accuracy | 0.8125 |" in body and "predictions" not in body
    assert "Evaluation `tinyrun/quickstart.json`" in body and "| stage3/accuracy | 0.8125 |" in body
    # stage 1 of the run is listed too, without a recipe
    assert "| 1 | – |" in body and "| 3 (this checkpoint) | long_sft |" in body


def test_export_of_a_bare_checkpoint_says_what_is_missing(tmp_path, tok):
    model = tiny_chat_model(tok, seed=1)
    ckpt = tmp_path / "some_checkpoint"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    out = tmp_path / "out"
    assert main([str(ckpt), str(out), "--no-load-check"]) == 0
    body = (out / "README.md").read_text()
    assert "training recipe, stage, data mix and training metrics are not known" in body
    assert "no evaluation results were found" in body
    assert "The data mix is not recorded" in body
    proc = json.loads((out / "processor_config.json").read_text())
    assert (proc["min_frames"], proc["max_frames"]) == (64, 512)  # the documented default
    # an existing export is not overwritten by accident
    assert main([str(ckpt), str(out), "--no-load-check"]) == 1
    assert main([str(ckpt), str(out), "--no-load-check", "--overwrite", "--max-frames", "32"]) == 0
    assert json.loads((out / "processor_config.json").read_text())["max_frames"] == 32


@pytest.mark.parametrize("damage", ["truncated-shard", "garbled-tokenizer-config", "missing-shard"])
def test_export_of_a_damaged_checkpoint_names_the_bad_file(tmp_path, tok, capsys, damage):
    model = tiny_chat_model(tok, seed=2)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt, max_shard_size="300KB" if damage == "missing-shard" else "5GB")
    tok.save_pretrained(ckpt)
    shards = sorted(ckpt.glob("*.safetensors"))
    if damage == "truncated-shard":
        bad = shards[0]
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size - 1000])
    elif damage == "missing-shard":
        bad = shards[-1]
        bad.unlink()
    else:
        bad = ckpt / "tokenizer_config.json"
        bad.write_text(bad.read_text()[:-20])
    out = tmp_path / "out"
    assert main([str(ckpt), str(out), "--no-load-check"]) == 1
    err = capsys.readouterr().err
    assert "is damaged" in err and str(bad) in err, err
    assert not out.exists()


def test_export_options_yarn_and_dropout(tmp_path, run_dir):
    out = tmp_path / "yarn_export"
    assert main([str(run_dir / "stage3"), str(out), "--yarn", "4", "--visual-dropout", "2:0.5:uniform,3:0.25:text",
                 "--no-load-check"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["rope_parameters"]["rope_type"] == "yarn"
    assert cfg["text_config"]["rope_parameters"]["factor"] == 4.0
    assert cfg["text_config"]["max_position_embeddings"] == 4096
    assert cfg["visual_dropout_layers"] == [2, 3] and cfg["visual_dropout_in_inference"] is True
    back = VideoFlashForConditionalGeneration.from_pretrained(out)
    assert back.get_decoder().rotary_emb.rope_type == "yarn"


def test_the_model_package_is_checked_for_self_containment(tmp_path):
    assert check_model_package(model_package_files()[0].parent) == []
    bad = tmp_path / "pkg"
    bad.mkdir()
    (bad / "modeling_x.py").write_text("import torch\nfrom videoflash.data import tokenizer\nfrom .missing import y\n"
                                       "from . import sibling\nimport yaml\n")
    (bad / "sibling.py").write_text("import json\n")
    problems = check_model_package(bad)
    assert len(problems) == 4, problems
    assert any("videoflash.data" in p for p in problems) and any("yaml" in p for p in problems)
    assert any(".missing" in p for p in problems) and any("from . import sibling" in p for p in problems)


# --------------------------------------------------------------------------------------------------
# the clean environment
# --------------------------------------------------------------------------------------------------


def _distribution_closure(roots: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions of ``roots`` and their runtime requirements (markers evaluated,
    no extras)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional requirement that is not installed
        seen[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean_env")
    closure = _distribution_closure(CLEAN_ENV_ROOTS)
    assert "videoflash" not in closure and "av" not in closure
    assert {"torch", "transformers", "timm", "decord2", "tokenizers", "safetensors", "huggingface-hub"} <= set(closure)
    site = root / "site"
    site.mkdir()
    for dist in closure.values():
        base = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            src, dst = base / top, site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    env_dir = root / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "clean_deps.pth").write_text(str(site) + "\n")
    return python


CLEAN_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    assert importlib.util.find_spec("videoflash") is None, "videoflash is importable"
    assert importlib.util.find_spec("av") is None, "PyAV is importable"
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor, AutoConfig

    export, video, question = sys.argv[1:4]
    model = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    inputs = processor(text=question, videos=video)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        out = model.generate(**inputs, max_new_tokens=8)
    new = out[0, inputs["input_ids"].shape[1]:]
    answer, history = model.chat(video, question, processor=processor, max_new_tokens=8, return_history=True)
    follow = model.chat(video, "Where does it move?", history=history, max_new_tokens=8)  # processor from the dir
    # the chunked-prefill engine ships in the export too (budget above the prompt: the same answer)
    kv_answer = model.chat(video, question, processor=processor, max_new_tokens=8, kv_compression="adaretake",
                           kv_budget=10**6, kv_options={"chunk_frames": 4})
    x2l_answer = model.chat(video, question, processor=processor, max_new_tokens=8, kv_compression="videox2l",
                            kv_options={"chunk_frames": 4, "top_k": 1})
    causal = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    from transformers import AutoModelForImageTextToText
    itt = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True)
    print(json.dumps({
        "model_module": type(model).__module__,
        "processor_module": type(processor).__module__,
        "config_module": type(AutoConfig.from_pretrained(export, trust_remote_code=True)).__module__,
        "causal_class": type(causal).__name__,
        "itt_class": type(itt).__name__,
        "input_ids": inputs["input_ids"][0].tolist(),
        "frames": int(inputs["video_frame_counts"][0]),
        "pixels_sum": int(inputs["pixel_values_videos"].long().sum()),
        "last_logits": logits.tolist(),
        "generated": new.tolist(),
        "answer": answer,
        "follow": follow,
        "kv_answer": kv_answer,
        "x2l_answer": x2l_answer,
        "engine_module": type(model._videoflash_kv_engine).__module__,
    }))
""")


def _run_clean(python, args, tmp_path, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"), PYTHONNOUSERSITE="1", **env_extra)
    return subprocess.run([str(python), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_clean_environment_has_no_videoflash(clean_python, tmp_path):
    res = _run_clean(clean_python, ["-c", "import videoflash"], tmp_path)
    assert res.returncode != 0 and "No module named 'videoflash'" in res.stderr
    res = _run_clean(clean_python, ["-c", "import torch, transformers, timm, decord; print(transformers.__version__)"],
                     tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


def test_export_answers_about_an_mp4_in_a_clean_environment(clean_python, exported, run_dir, video, tok, tmp_path):
    question = "What color is the shape?"
    res = _run_clean(clean_python, ["-c", CLEAN_SCRIPT, str(exported), str(video), question], tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    # the classes came from the export's own code
    for key in ("model_module", "processor_module", "config_module"):
        assert got[key].startswith("transformers_modules."), got[key]
    assert got["causal_class"] == got["itt_class"] == "VideoFlashForConditionalGeneration"

    # the in-repo model on inputs built by hand: frames by the data room's decoder at the hand-worked
    # indices of dynamic_fps1 (15 s -> 12 frames, midpoints 2, 7, ..., 57), the prompt written out
    model = VideoFlashForConditionalGeneration.from_pretrained(run_dir / "stage3" / "export").eval()
    # (the clean environment has no torchcodec: its processor's "auto" decodes with decord)
    frames = VideoDecoder(video.read_bytes(), size=64, backend="decord").frames([5 * k + 2 for k in range(12)])
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
              "The video lasts for 15.00 seconds, and 12 frames are uniformly sampled from it. "
              f"{question}<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    assert got["input_ids"] == ids[0].tolist()
    assert got["frames"] == 12 and got["pixels_sum"] == int(frames.long().sum())
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values_videos=frames).logits[0, -1]
        out = model.generate(input_ids=ids, pixel_values_videos=frames, max_new_tokens=8, do_sample=False,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)
    torch.testing.assert_close(torch.tensor(got["last_logits"]), logits, rtol=1e-4, atol=1e-4)
    expected = out[0, ids.shape[1]:].tolist()
    assert got["generated"] == expected
    assert got["answer"] == tok.decode(expected, skip_special_tokens=True).strip()
    assert isinstance(got["follow"], str)
    assert got["kv_answer"] == got["answer"] and isinstance(got["x2l_answer"], str)
    assert got["engine_module"].startswith("transformers_modules.")


# --------------------------------------------------------------------------------------------------
# upload
# --------------------------------------------------------------------------------------------------


class RecordingHubApi:
    """A stand-in for ``huggingface_hub.HfApi`` (no hub is reachable in tests): it records
    ``create_repo`` / ``upload_folder`` calls and, at upload time, what the folder holds."""

    def __init__(self, fail_upload: Exception | None = None):
        self.calls = []
        self.fail_upload = fail_upload

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        snapshot = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}
        self.calls.append(("upload_folder", repo_id, {**kwargs, "folder_path": str(folder), "files": snapshot}))
        if self.fail_upload is not None:
            raise self.fail_upload
        return {"commit_url": f"https://huggingface.co/{repo_id}/commit/0123abc"}


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_push_creates_the_repo_and_uploads_the_checked_folder(tmp_path, run_dir, capsys):
    api = RecordingHubApi()
    out = tmp_path / "to_push"
    rc = main([str(run_dir), str(out), "--push", "someone/tiny-videoflash", "--private", "--no-load-check",
               "--max-shard-size", "300KB"],
              publisher=HubPublisher(api=api))
    assert rc == 0
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    _, repo, kw = api.calls[0]
    assert repo == "someone/tiny-videoflash" and kw == {"private": True, "repo_type": "model", "exist_ok": True}
    _, repo, kw = api.calls[1]
    assert repo == "someone/tiny-videoflash" and kw["repo_type"] == "model"
    assert Path(kw["folder_path"]) == out.resolve()
    files = kw["files"]
    # what was uploaded is the complete export: auto_map targets, every shard of the index, the card
    for target in AUTO_MAP.values():
        assert target.split(".")[0] + ".py" in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) <= set(files)
    assert files == _snapshot(out)
    assert "someone/tiny-videoflash" in (out / "README.md").read_text()  # the usage snippet names the repo
    assert "uploaded" in capsys.readouterr().out


def test_a_failed_upload_keeps_the_export_and_says_how_to_retry(tmp_path, run_dir):
    out = tmp_path / "offline_push"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf_home"),
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    # the real HfApi: with HF_HUB_OFFLINE=1 it refuses to open any connection
    res = subprocess.run([sys.executable, "-m", "videoflash.export", str(run_dir), str(out), "--push",
                          "someone/tiny-videoflash", "--no-load-check"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 3, res.stderr[-3000:]
    assert f"the export is intact at {out.resolve()}" in res.stderr
    retry = f"python -m videoflash.export --upload-only {out.resolve()} --push someone/tiny-videoflash"
    assert retry in res.stderr
    assert f"hf upload someone/tiny-videoflash {out.resolve()} . --repo-type model" in res.stderr
    before = _snapshot(out)
    assert "README.md" in before and "config.json" in before
    # the retry command, against the stand-in: the same folder goes up, untouched
    api = RecordingHubApi()
    assert main(["--upload-only", str(out), "--push", "someone/tiny-videoflash"], publisher=HubPublisher(api=api)) == 0
    assert api.calls[1][2]["files"] == before == _snapshot(out)
    # an upload that fails half way through leaves the folder as it was, too
    api = RecordingHubApi(fail_upload=ConnectionError("connection reset"))
    assert main(["--upload-only", str(out), "--push", "someone/tiny-videoflash"], publisher=HubPublisher(api=api)) == 3
    assert _snapshot(out) == before
    # and an incomplete folder is refused before any network call
    shutil.copytree(out, tmp_path / "broken")
    (tmp_path / "broken" / "processing_videoflash.py").unlink()
    api = RecordingHubApi()
    assert main(["--upload-only", str(tmp_path / "broken"), "--push", "someone/x"], publisher=HubPublisher(api=api)) == 1
    assert api.calls == []


def test_model_card_tables_the_offline_benchmark_results(tmp_path, tok):
    model = tiny_chat_model(tok, seed=1)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    (ckpt / "eval").mkdir()
    result = {"benchmark": "mlvu", "total": 4, "correct": 3, "accuracy": 0.75,
              "categories": {"task_type": {"plotQA": {"correct": 2, "total": 2, "accuracy": 1.0},
                                           "order": {"correct": 1, "total": 2, "accuracy": 0.5}}},
              "predictions": [{"id": "a", "output": "B", "correct": True}]}
    (ckpt / "eval" / "mlvu.json").write_text(json.dumps(result))
    out = tmp_path / "out"
    assert main([str(ckpt), str(out), "--no-load-check"]) == 0
    body = (out / "README.md").read_text()
    assert "| `ckpt/eval/mlvu.json` | 4 | 75.0 |" in body
    assert "| task_type | plotQA | 2 | 100.0 |" in body and "| task_type | order | 2 | 50.0 |" in body
