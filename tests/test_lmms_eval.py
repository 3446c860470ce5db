"""The lmms-eval plug-in for real: lmms-eval's own CLI (``python -m lmms_eval``, installed in the eval
venv ``.venv-eval`` that ``make eval-venv`` builds) finds the model ``videoflash`` through its entry
point and runs two local tasks (``--include_path``) over a VideoMME-format folder of real mp4 files,
offline. Its per-sample replies must equal those of videoflash's offline runner on the same samples
(run here, in the project's venv: another process, another loading path), its score must be the
runner's, and its option log-likelihoods must equal a full forward pass over the raw frames computed
here (not the plug-in's pre-encoded video tokens).

lmms-eval pins packages the training stack does not accept (av<16), so it lives in a venv of its own;
the tests are skipped, saying so, only when that venv has not been built."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.bench_fixtures import write_export
from tests.inference_helpers import write_mp4
from videoflash.eval import benchmarks as B
from videoflash.eval.runner import AskSettings, load_model, run

REPO = Path(__file__).resolve().parents[1]
EVAL_PY = REPO / os.environ.get("EVAL_VENV", ".venv-eval") / "bin" / "python"
TASK_FILES = Path(__file__).resolve().parent / "lmms_task"
FRAMES = dict(max_frames=8, min_frames=4)
TASKS = ("videoflash_local_videomme", "videoflash_local_videomme_mc", "videoflash_local_videomme_rounds")

needs_eval_venv = pytest.mark.skipif(
    not EVAL_PY.exists(), reason=f"the eval venv {EVAL_PY.parent.parent} is absent: `make eval-venv` builds it "
                                 "(`make test` does so first)")


def _write_videomme(root: Path) -> int:
    """A VideoMME folder as published (``videomme.json``, ``data/<videoID>.mp4``): two real mp4 files
    of different lengths (so different frames and time messages) and questions that differ, so that
    equal replies say something about the frames and the prompt each side used."""
    (root / "data").mkdir(parents=True)
    write_mp4(root / "data" / "v1.mp4", 12, fps=4)
    write_mp4(root / "data" / "v2.mp4", 40, fps=4)
    questions = [("How many planets?", ["A. 1", "B. 2", "C. 3", "D. 4"], "C"),
                 ("Which colour comes first?", ["A. red", "B. green", "C. blue", "D. grey"], "A"),
                 ("What moves?", ["A. a ball", "B. a car", "C. nothing", "D. the camera"], "D")]
    recs = [{"video_id": f"00{k}", "duration": "short" if vid == "v1" else "medium", "domain": "Knowledge",
             "sub_category": "Astronomy", "url": "", "videoID": vid, "question_id": f"{vid}-{k}",
             "task_type": "Counting Problem", "question": q, "options": opts, "answer": a}
            for vid in ("v1", "v2") for k, (q, opts, a) in enumerate(questions)]
    (root / "videomme.json").write_text(json.dumps(recs))
    return len(recs)


def _offline_prefix() -> list[str]:
    """``unshare -n`` (a network namespace with no interface up) where it works here, so that any
    download lmms-eval or a library tried would fail the run; the HF_*_OFFLINE variables otherwise."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


@pytest.fixture(scope="module")
def lmms_run(tmp_path_factory):
    """One ``python -m lmms_eval`` run of both local tasks; returns its folders and logged samples."""
    root = tmp_path_factory.mktemp("lmms")
    export = write_export(root / "export")
    n = _write_videomme(root / "data")
    tasks = root / "tasks"
    tasks.mkdir()
    shutil.copy(TASK_FILES / "utils.py", tasks / "utils.py")
    for y in TASK_FILES.glob("*.yaml"):
        (tasks / y.name).write_text(y.read_text().replace("@DATA@", str(root / "data")))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "WANDB_", "LMMS_EVAL"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(root / "hf"),
               VIDEOFLASH_LMMS_DATA=str(root / "data"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    args = [*_offline_prefix(), str(EVAL_PY), "-m", "lmms_eval", "--model", "videoflash",
            "--model_args", f"pretrained={export},max_frames={FRAMES['max_frames']},min_frames={FRAMES['min_frames']}",
            "--tasks", ",".join(TASKS), "--include_path", str(tasks),
            "--batch_size", "1", "--output_path", str(root / "out"), "--log_samples"]
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    # lmms-eval 0.7 logs a failing task and still exits 0: the logged samples are what tell
    samples = {}
    for task in TASKS:
        files = glob.glob(str(root / "out" / "**" / f"*samples_{task}.jsonl"), recursive=True)
        assert len(files) == 1, (task, files, proc.stdout[-2000:])
        samples[task] = [json.loads(line) for line in Path(files[0]).read_text().splitlines() if line.strip()]
    results = glob.glob(str(root / "out" / "**" / "*results.json"), recursive=True)
    assert len(results) == 1, results
    return {"root": root, "export": export, "n": n, "samples": samples,
            "results": json.loads(Path(results[0]).read_text()), "log": proc.stdout + proc.stderr}


def _docs(root: Path) -> list[dict]:
    """The task's documents in lmms-eval's ``doc_id`` order (the annotation file's)."""
    return json.loads((root / "data" / "videomme.json").read_text())


@needs_eval_venv
def test_lmms_eval_replies_equal_the_offline_runner(lmms_run):
    root = lmms_run["root"]
    summary = run("videomme", str(root / "data"), str(lmms_run["export"]), str(root / "runner"),
                  AskSettings(**FRAMES), progress=False)
    runner = {p["id"]: p for p in json.loads((root / "runner" / "videomme.json").read_text())["predictions"]}
    logged = lmms_run["samples"]["videoflash_local_videomme"]
    assert len(logged) == lmms_run["n"] == summary["total"]
    docs = _docs(root)
    samples = {s.id: s for s in B.get_benchmark("videomme").load(root / "data")}
    replies = {}
    for rec in logged:
        qid = docs[rec["doc_id"]]["question_id"]
        assert rec["input"] == samples[qid].prompt  # the task's prompt is the runner's, to the character
        replies[qid] = rec["filtered_resps"]
    assert replies == {i: p["output"] for i, p in runner.items()}
    assert any(r.strip() for r in replies.values())  # something was generated, not only end of text
    assert len(set(replies.values())) > 1  # the replies differ with the video and the question
    # lmms-eval's aggregate is the runner's accuracy
    res = lmms_run["results"]["results"]["videoflash_local_videomme"]
    assert res["accuracy,none"] == pytest.approx(summary["accuracy"])


@needs_eval_venv
def test_lmms_eval_option_scores_equal_a_forward_over_the_frames(lmms_run):
    """Each option's log-likelihood as lmms-eval logged it (negated) equals log-softmax over a full forward of
    prompt + letter with the processor's raw frames (the plug-in goes through pre-encoded video
    tokens), and lmms-eval's accuracy is the share of questions whose best option is the answer."""
    root = lmms_run["root"]
    model, processor = load_model(str(lmms_run["export"]), device="cpu", **FRAMES)
    samples = {s.id: s for s in B.get_benchmark("videomme").load(root / "data")}
    docs = _docs(root)
    logged = lmms_run["samples"]["videoflash_local_videomme_mc"]
    assert len(logged) == lmms_run["n"]
    correct = 0
    for rec in logged:
        s = samples[docs[rec["doc_id"]]["question_id"]]
        inputs = processor(text=s.prompt, videos=s.video, **FRAMES)
        expect = []
        for letter in "ABCD":
            cont = processor.tokenizer(letter, add_special_tokens=False)["input_ids"]
            ids = torch.cat([inputs["input_ids"], torch.tensor([cont])], dim=1)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                               pixel_values_videos=inputs["pixel_values_videos"],
                               video_frame_counts=inputs["video_frame_counts"]).logits
            logp = torch.log_softmax(logits[0, -len(cont) - 1:-1].float(), -1)
            expect.append(float(sum(logp[i, t] for i, t in enumerate(cont))))
        # lmms-eval logs them as strings; its multiple-choice scoring takes the smallest: the plug-in
        # gives the negative log-likelihood
        got = [-float(nll) for nll, _greedy in rec["filtered_resps"]]
        assert got == pytest.approx(expect, abs=1e-3)
        correct += int(max(range(4), key=lambda i: expect[i]) == "ABCD".index(s.answer))
    res = lmms_run["results"]["results"]["videoflash_local_videomme_mc"]
    assert res["acc,none"] == pytest.approx(correct / len(logged))


@needs_eval_venv
def test_lmms_eval_multi_round_replies_follow_the_conversation(lmms_run):
    """Round two is asked with round one as history: the replies equal a two-turn ``model.chat``
    conversation (``return_history``) with the same frames, and lmms-eval got both rounds."""
    import importlib.util

    root = lmms_run["root"]
    spec = importlib.util.spec_from_file_location("lmms_task_utils", TASK_FILES / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    model, processor = load_model(str(lmms_run["export"]), device="cpu", **FRAMES)
    samples = {s.id: s for s in B.get_benchmark("videomme").load(root / "data")}
    docs = _docs(root)
    logged = lmms_run["samples"]["videoflash_local_videomme_rounds"]
    assert len(logged) == lmms_run["n"]
    gen = {"do_sample": False, "max_new_tokens": 16}
    for rec in logged:
        s = samples[docs[rec["doc_id"]]["question_id"]]
        first, history = model.chat(s.video, s.prompt, processor=processor, generation_config=gen,
                                    return_history=True, **FRAMES)
        second = model.chat(s.video, utils.FOLLOW_UP, processor=processor, history=history, generation_config=gen,
                            **FRAMES)
        assert rec["filtered_resps"] == [first, second]
    assert lmms_run["results"]["results"]["videoflash_local_videomme_rounds"]["rounds,none"] == 2.0


@needs_eval_venv
def test_lmms_eval_ran_offline_and_found_the_plugin(lmms_run):
    """The model came from the entry point (no LMMS_EVAL_PLUGINS), and nothing was downloaded:
    the HF cache lmms-eval was given holds no hub files."""
    hub = lmms_run["root"] / "hf" / "hub"
    assert not hub.exists() or not any(hub.iterdir())
    assert lmms_run["results"]["config"]["model"] == "videoflash"
