"""KV compression through ``model.chat`` and ``python -m videoflash.chat`` on real mp4 files: with a
budget above the prompt AdaReTaKe answers as the plain chat; Video-X²L's prefill serves every turn
about the same video; the CLI flags reach the engine."""

from __future__ import annotations

import io

import pytest

from tests.chat_fixtures import chat_processor, model, tok, video  # noqa: F401
from tests.inference_helpers import collecting_streamer, tiny_chat_model

Q1, Q2 = "What color is the shape?", "Which direction does the shape move?"


def test_adaretake_chat_without_pressure_answers_as_plain_chat_and_streams(tok, model, video):
    proc = chat_processor(tok, model)
    plain, hist = model.chat(str(video), Q1, processor=proc, max_new_tokens=10, return_history=True)
    for positions in ("keep", "reforge"):
        streamer = collecting_streamer()
        kv = model.chat(str(video), Q1, processor=proc, max_new_tokens=10, kv_compression="adaretake",
                        kv_budget=10**6, kv_options={"chunk_frames": 4, "positions": positions}, streamer=streamer)
        assert kv == plain and kv
    assert streamer.chunks[-1] == "end"
    assert tok.decode([t for c in streamer.chunks[1:-1] for t in c], skip_special_tokens=True).strip() == plain
    # a second turn (history after the video) as well
    plain2 = model.chat(str(video), Q2, processor=proc, history=hist, max_new_tokens=10)
    kv2 = model.chat(str(video), Q2, processor=proc, history=hist, max_new_tokens=10, kv_compression="adaretake",
                     kv_budget=10**6, kv_options={"chunk_frames": 8})
    assert kv2 == plain2
    # under a budget the cache shrinks and an answer still comes
    small = model.chat(str(video), Q1, processor=proc, max_new_tokens=10, kv_compression="adaretake", kv_budget=40,
                       kv_options={"chunk_frames": 4})
    engine = model._videoflash_kv_engine
    assert isinstance(small, str) and all(sum(a) < 48 for a in engine.cache.allocations)
    with pytest.raises(ValueError, match="generation takes only"):
        model.chat(str(video), Q1, processor=proc, kv_compression="adaretake", repetition_penalty=1.2)
    with pytest.raises(ValueError, match="has no video"):
        model.chat(None, Q1, processor=proc, kv_compression="adaretake")


def test_x2l_chat_reuses_the_prefill_across_turns(tok, model, video):
    proc = chat_processor(tok, model)
    model._videoflash_kv_store = None
    opts = {"chunk_frames": 4, "top_k": 1}
    a1, hist = model.chat(str(video), Q1, processor=proc, max_new_tokens=8, kv_compression="videox2l",
                          kv_options=opts, return_history=True)
    store = model._videoflash_kv_store[1]
    a2 = model.chat(str(video), Q2, processor=proc, history=hist, max_new_tokens=8, kv_compression="videox2l",
                    kv_options=opts)
    assert model._videoflash_kv_store[1] is store  # the second turn ran on the first turn's prefill
    model._videoflash_kv_store = None  # a fresh prefill for the same second turn
    assert model.chat(str(video), Q2, processor=proc, history=hist, max_new_tokens=8, kv_compression="videox2l",
                      kv_options=opts) == a2
    assert model._videoflash_kv_store[1] is not store
    # with every chunk in detail and no compression, Video-X²L is the plain chat
    full = model.chat(str(video), Q1, processor=proc, max_new_tokens=8, kv_compression="videox2l",
                      kv_options={"chunk_frames": 4, "alpha_low": 1, "alpha_high": 1, "top_k": 99})
    assert full == model.chat(str(video), Q1, processor=proc, max_new_tokens=8) and a1


def test_chat_with_published_dropout_yarn_and_compression(tok, video):
    deep = tiny_chat_model(tok, seed=1, layers=20, hidden=32)
    deep.enable_yarn(2.0)
    proc = chat_processor(tok, deep)
    # one chunk: the engine's in-chunk dropout is the whole-prompt dropout
    plain = deep.chat(str(video), Q1, processor=proc, visual_dropout="published", max_new_tokens=6)
    kv = deep.chat(str(video), Q1, processor=proc, visual_dropout="published", max_new_tokens=6,
                   kv_compression="adaretake", kv_budget=10**6, kv_options={"chunk_frames": 64})
    assert kv == plain
    deep.chat(str(video), Q1, processor=proc, visual_dropout="published", max_new_tokens=6,
              kv_compression="adaretake", kv_budget=30, kv_options={"chunk_frames": 4})
    lengths = [deep._videoflash_kv_engine.cache.layer_length(i) for i in range(20)]
    assert lengths[0] > lengths[4] > lengths[18]  # dropout after layers 4 and 18, compression in every layer
    assert deep.config.visual_dropout_in_inference is False


def test_cli_kv_flags(tok, model, video, tmp_path, capsys):
    from videoflash.inference.chat_cli import main

    d = tmp_path / "export"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    base = ["--model", str(d), "--video", str(video), "--max-new-tokens", "6", "--min-frames", "8",
            "--max-frames", "24", "--no-stream"]
    out = io.StringIO()
    assert main(base + [Q1, Q2], stdout=out) == 0
    plain = out.getvalue().splitlines()
    for flags in (["--kv-compression", "adaretake", "--kv-budget", "1000000", "--kv-chunk-frames", "4",
                   "--kv-positions", "reforge", "--kv-max-guide-length", "6"],
                  ["--kv-compression", "videox2l", "--kv-chunk-frames", "4", "--kv-top-k", "99"]):
        out = io.StringIO()
        assert main(base + flags + [Q1, Q2], stdout=out) == 0
        if "adaretake" in flags:
            assert out.getvalue().splitlines() == plain
        else:
            assert len(out.getvalue().splitlines()) == 2
    assert main(base + ["--kv-compression", "videox2l", "--kv-budget", "100", Q1], stdout=io.StringIO()) == 1
    assert "no token budget" in capsys.readouterr().err
    assert main(base + ["--kv-compression", "adaretake", "--kv-budget", "30", "--kv-chunk-frames", "4", "--stats", Q1],
                stdout=io.StringIO()) == 0
    assert "KV cache" in capsys.readouterr().err
