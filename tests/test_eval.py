"""The held-out synthetic evaluation: prompts identical to training up to the answer, scores and
chance levels against the corpus's own answers and meta.json."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from videoflash.eval.synthetic import EvalResult, FrameSettings, TaskScore, evaluate, load_records, normalize_answer, prepare


def test_answer_normalisation():
    assert normalize_answer("  Red.") == "red"
    assert normalize_answer("blue\n") == "blue"
    assert normalize_answer("yellow!") == normalize_answer("Yellow")
    assert normalize_answer("green blue") != "green"


def test_overall_accuracy_and_chance_are_question_weighted():
    r = EvalResult(tasks={"color": TaskScore(correct=3, total=4, chance=1 / 4), "shape": TaskScore(correct=0, total=2, chance=1 / 3)})
    assert r.accuracy == pytest.approx(3 / 6)
    assert r.chance == pytest.approx((4 * 0.25 + 2 / 3) / 6)
    assert "| **all** | 6 | 0.500 |" in r.table()


def test_eval_prompt_is_the_training_sample_up_to_its_answer(tiny_corpus):
    from videoflash.data.conversation import ConversationTokenizer, normalize_conversation, place_placeholder, time_message
    from videoflash.data.decode import VideoDecoder
    from videoflash.data.tokenizer import build_chatml_tokenizer

    tok = build_chatml_tokenizer()
    conv = ConversationTokenizer(tok, "chatml")
    fs = FrameSettings(image_size=64, policy="dynamic_fps1", min_frames=4, max_frames=8)
    for rec in load_records(tiny_corpus / "heldout.jsonl", max_samples=4):
        item = prepare(rec, tiny_corpus, tok, fs)
        dec = VideoDecoder((tiny_corpus / rec["video"]).read_bytes(), size=64)
        n = item["frames"].shape[0]
        messages = place_placeholder(normalize_conversation(rec["conversations"]), True, time_message(dec.duration, n))
        full = conv(messages)
        first_label = next(i for i, x in enumerate(full.labels) if x != -100)
        assert item["input_ids"] == full.input_ids[:first_label]
        assert tok.decode(full.input_ids[first_label:]).startswith(rec["answer"])


def _tiny_model():
    """(tokenizer, a random 64 px model): one UMT block of width 32, one Qwen2 layer of width 32."""
    from videoflash.data.tokenizer import build_chatml_tokenizer
    from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration

    tok = build_chatml_tokenizer()
    text = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048)
    torch.manual_seed(0)
    model = VideoFlashForConditionalGeneration.from_parts(
        text=text, vision=None, vision_config=dict(width=32, depth=1, num_heads=4, image_size=64, patch_size=16),
        tokenizer=tok, tokens_per_clip=8, tokens_per_image=8,
    )
    return tok, model


def test_evaluate_scores_every_question_against_its_answer(tiny_corpus, tmp_path):
    tok, model = _tiny_model()
    fs = FrameSettings(image_size=64, policy="dynamic_fps1", min_frames=4, max_frames=8)
    result = evaluate(model, tok, tiny_corpus / "heldout.jsonl", fs, batch_size=5, max_new_tokens=3, progress=False)

    records = load_records(tiny_corpus / "heldout.jsonl")
    meta = json.loads((tiny_corpus / "meta.json").read_text())
    assert result.total == len(records)
    assert {t: s.total for t, s in result.tasks.items()} == dict(Counter(r["task"] for r in records))
    for task, score in result.tasks.items():
        assert score.chance == pytest.approx(meta["tasks"][task]["chance"])
    by_id = {r["id"]: r for r in records}
    for p in result.predictions:
        assert p["correct"] == (normalize_answer(p["output"]) == by_id[p["id"]]["answer"])
    assert sum(p["correct"] for p in result.predictions) == sum(s.correct for s in result.tasks.values())


def test_quickstart_needle_figure_counts_the_longest_half_of_the_needle_videos():
    from videoflash.quickstart import needle_on_longest

    preds = [  # six needle questions over videos of 60..110 s, a short-clip question that must not count
        {"task": "needle_color", "duration": 60.0, "correct": True},
        {"task": "needle_time", "duration": 70.0, "correct": True},
        {"task": "needle_color", "duration": 80.0, "correct": False},
        {"task": "needle_time", "duration": 90.0, "correct": True},
        {"task": "needle_color", "duration": 110.0, "correct": False},
        {"task": "needle_time", "duration": 100.0, "correct": True},
        {"task": "color", "duration": 4.0, "correct": False},
    ]
    got = needle_on_longest(preds)
    # the longest half: 90, 100 and 110 s, two of the three right
    assert (got["correct"], got["total"], got["min_seconds"]) == (2, 3, 90.0)
    assert got["accuracy"] == 2 / 3
    assert needle_on_longest(preds[-1:])["total"] == 0


def test_an_export_loaded_at_another_size_runs_its_encoder_at_that_size(tmp_path):
    """Asked for 96 px, an export trained at 64 px is loaded as stage 4 starts: its encoder built at 96
    px (the trainer's rule: ``vision_config.image_size`` set, the position table resized), i.e. the
    same model as the export with 96 written into its config.json by hand, taking 96 px clips."""
    import shutil

    from videoflash.eval.synthetic import load_export

    tok, model = _tiny_model()
    export = tmp_path / "export"
    model.save_pretrained(export)
    tok.save_pretrained(export)
    by_hand = tmp_path / "export96"
    shutil.copytree(export, by_hand)
    cfg = json.loads((by_hand / "config.json").read_text())
    cfg["vision_config"]["image_size"] = 96
    (by_hand / "config.json").write_text(json.dumps(cfg))

    got, _ = load_export(export, 96)
    want, _ = load_export(by_hand)
    same, _ = load_export(export)
    assert got.config.image_size == want.config.image_size == 96 and same.config.image_size == 64
    clip = torch.rand(1, 4, 3, 96, 96)  # one 4-frame clip at 96 px: 6 x 6 patches per frame
    with torch.no_grad():
        a, b = got.vision_tower(clip), want.vision_tower(clip)
    assert a.shape == b.shape and a.shape[-2] == 4 * 36
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="built for 64x64"):
        same.vision_tower(clip)
