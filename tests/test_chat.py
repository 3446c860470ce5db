"""``model.chat`` and ``python -m videoflash.chat`` on a tiny model and real mp4 files.

The reference answer is greedy decoding by repeated full forward passes over inputs built by hand
(frames decoded by the data room's decoder at the hand-worked indices, the ChatML prompt written out),
so ``chat`` is checked end to end: sampling, decoding, chunked encoding, prompt, history, generation.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from tests.chat_fixtures import chat_processor, model, tok, video  # noqa: F401
from tests.inference_helpers import collecting_streamer, tiny_chat_model
from videoflash.data.decode import VideoDecoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def _reference_frames(video):
    return VideoDecoder(video.read_bytes(), size=64).frames([5 * k + 2 for k in range(12)])


def _greedy(model, tok, prompt: str, frames, max_new: int, query_last_prompt_token: bool = False) -> str:
    """Greedy decoding by full forward passes (no cache), stopping at <|im_end|>."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            x = torch.tensor([ids + new])
            kw = {}
            if query_last_prompt_token:  # text-guided dropout queries the last prompt token
                kw["dropout_query_positions"] = torch.tensor([len(ids) - 1])
            logits = model(input_ids=x, pixel_values_videos=frames, **kw).logits[0, -1]
            nxt = int(logits.argmax())
            new.append(nxt)
            if nxt == eos:
                break
    return tok.decode(new, skip_special_tokens=True).strip()


def _first_turn(question: str) -> str:
    return ("<|im_start|>user\n<image>\nThe video lasts for 15.00 seconds, and 12 frames are uniformly sampled "
            f"from it. {question}<|im_end|>\n")


def test_chat_answers_as_greedy_full_forwards_and_keeps_history(tok, model, video):
    proc = chat_processor(tok, model)
    frames = _reference_frames(video)
    q1, q2 = "What color is the shape?", "Which direction does the shape move?"
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        a1, hist = model.chat(str(video), q1, processor=proc, return_history=True, max_new_tokens=10,
                              max_clips_per_batch=2, decode_batch_frames=8)
        assert calls == [2, 1]  # 3 clips, at most 2 per encoder call
        a2, hist2 = model.chat(str(video), q2, processor=proc, history=hist, return_history=True, max_new_tokens=10)
        assert calls == [2, 1]  # the second turn reuses the video's tokens
    finally:
        hook.remove()
    assistant = "<|im_start|>assistant\n"
    ref1 = _greedy(model, tok, SYSTEM + _first_turn(q1) + assistant, frames, 10)
    assert a1 == ref1 and a1
    prompt2 = SYSTEM + _first_turn(q1) + assistant + a1 + "<|im_end|>\n<|im_start|>user\n" + q2 + "<|im_end|>\n" + assistant
    assert a2 == _greedy(model, tok, prompt2, frames, 10)
    assert hist2 == [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                     {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]


def test_chat_streams_the_same_answer(tok, model, video):
    streamer = collecting_streamer()
    proc = chat_processor(tok, model)
    answer = model.chat(str(video), "What color is the shape?", processor=proc, streamer=streamer, max_new_tokens=6)
    assert streamer.chunks[-1] == "end"
    prompt_len = len(proc.prompt_inputs("What color is the shape?", time_msg=_time(), visual=True)["input_ids"][0])
    assert len(streamer.chunks[0]) == prompt_len  # the prompt first, then one token at a time
    generated = [t for chunk in streamer.chunks[1:-1] for t in chunk]
    assert tok.decode(generated, skip_special_tokens=True).strip() == answer


def _time():
    return "The video lasts for 15.00 seconds, and 12 frames are uniformly sampled from it."


def test_inference_dropout_option_and_the_published_preset(tok, video):
    # text-guided dropout on the 4-layer model matches full forwards with the same schedule
    model = tiny_chat_model(tok, seed=5)
    proc = chat_processor(tok, model)
    spec = "2:0.5:uniform,3:0.25:text"
    answer = model.chat(str(video), "What color is the shape?", processor=proc, visual_dropout=spec, max_new_tokens=8)
    assert model.config.visual_dropout_in_inference is False and model.config.visual_dropout_layers == []
    model.config.set_visual_dropout([2, 3], [0.5, 0.25], ["uniform", "text"], inference=True)
    ref = _greedy(model, tok, SYSTEM + _first_turn("What color is the shape?") + "<|im_start|>assistant\n",
                  _reference_frames(video), 8, query_last_prompt_token=True)
    model.config.visual_dropout_in_inference = False
    assert answer == ref

    # the published preset on a 20-layer LLM: 48 visual tokens, 36 kept after layer 4, 12 after layer 18
    deep = tiny_chat_model(tok, seed=1, layers=20, hidden=32)
    seen = {}

    def record(i):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            seen.setdefault(i, hidden.shape[1])  # the first call of each layer is the prefill

        return hook

    hooks = [layer.register_forward_pre_hook(record(i), with_kwargs=True)
             for i, layer in enumerate(deep.get_decoder().layers)]
    try:
        deep.chat(str(video), "What color is the shape?", processor=chat_processor(tok, deep), visual_dropout="published",
                  max_new_tokens=2)
    finally:
        for h in hooks:
            h.remove()
    text = len(chat_processor(tok, deep).prompt_inputs("What color is the shape?", time_msg=_time())["input_ids"][0]) - 1
    assert [seen[i] - text for i in range(20)] == [48] * 4 + [36] * 14 + [12] * 2
    with pytest.raises(ValueError, match="does not fit this model"):
        model.chat(str(video), "?", processor=proc, visual_dropout="published", max_new_tokens=1)


def test_text_only_chat(tok, model):
    answer = model.chat(None, "Hello", processor=chat_processor(tok, model), max_new_tokens=5)
    ref = _greedy(model, tok, SYSTEM + "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", None, 5)
    assert answer == ref


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok, model):
    """A training stage's export: weights + tokenizer, no processor file."""
    d = tmp_path_factory.mktemp("ckpt") / "export"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_multi_turn_streaming_and_interactive(tok, model, video, model_dir):
    from videoflash.inference.chat_cli import main

    q1, q2, q3 = "What color is the shape?", "Where does it move?", "How many shapes?"
    args = ["--model", str(model_dir), "--video", str(video), "--max-new-tokens", "6", "--min-frames", "8",
            "--max-frames", "24"]
    out = io.StringIO()
    assert main(args + [q1, q2, "--json"], stdout=out) == 0
    lines = out.getvalue().splitlines()
    proc = chat_processor(tok, model)
    a1, hist = model.chat(str(video), q1, processor=proc, return_history=True, max_new_tokens=6)
    a2, hist = model.chat(str(video), q2, processor=proc, history=hist, return_history=True, max_new_tokens=6)
    assert [x.strip() for x in lines[:2]] == [a1, a2]  # streamed token by token
    import json

    assert json.loads(lines[2]) == hist
    # interactive: more questions from stdin until an empty line; --no-stream prints whole answers
    out = io.StringIO()
    assert main(args + [q1, "-i", "--no-stream"], stdin=io.StringIO(f"{q2}\n{q3}\n\nignored\n"), stdout=out) == 0
    a3 = model.chat(str(video), q3, processor=proc, history=hist, max_new_tokens=6)
    assert out.getvalue().splitlines() == [a1, a2, a3]


def test_cli_entry_point_runs(tmp_path, video, model_dir, tok, model):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    res = subprocess.run(
        [sys.executable, "-m", "videoflash.chat", "--model", str(model_dir), "--video", str(video),
         "--max-new-tokens", "6", "--min-frames", "8", "--max-frames", "24", "--stats", "What color is the shape?"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    expected = model.chat(str(video), "What color is the shape?", processor=chat_processor(tok, model), max_new_tokens=6)
    assert res.stdout.strip() == expected
    assert "12 frames, 48 visual tokens" in res.stderr
