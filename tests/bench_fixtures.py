"""Small benchmark directories in each published annotation format (written from the schemas that
lmms-eval's task files read), over real synthetic mp4 files, and a tiny export to ask."""

from __future__ import annotations

import json
from pathlib import Path

from tests.inference_helpers import tiny_chat_model, tiny_tokenizer, write_mp4


def _mp4(path: Path, n: int = 12) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, n, fps=4)
    return path.name


def write_benchmark(name: str, root: Path) -> int:
    """Writes ``root`` for ``name``; returns the number of questions."""
    root.mkdir(parents=True, exist_ok=True)
    if name == "mvbench":
        (root / "json").mkdir()
        recs = {"action_sequence": [{"video": "a.mp4", "question": "What did the person do first?",
                                      "candidates": ["sat", "stood", "ran"], "answer": "stood"},
                                     {"video": "a.mp4", "question": "What next?", "candidates": ["x", "y"],
                                      "answer": "x", "start": 0.5, "end": 2.5}],
                "fine_grained_action": [{"video": "b.mp4", "question": "Which action?",
                                         "candidates": ["jump", "walk", "swim", "fly"], "answer": "fly"}]}
        _mp4(root / "video/star/Charades_segment/a.mp4")
        _mp4(root / "video/Moments_in_Time_Raw/videos/b.mp4")
        for task, r in recs.items():
            (root / "json" / f"{task}.json").write_text(json.dumps(r))
        return 3
    if name == "videomme":
        _mp4(root / "data/v1.mp4"), _mp4(root / "data/v2.mp4")
        recs = [{"video_id": "001", "duration": d, "domain": "Knowledge", "sub_category": "Astronomy",
                 "url": "", "videoID": vid, "question_id": f"{vid}-{k}", "task_type": t,
                 "question": "How many planets?", "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": a}
                for vid, d in (("v1", "short"), ("v2", "long"))
                for k, (t, a) in enumerate((("Counting Problem", "C"), ("OCR Problems", "A")))]
        (root / "videomme.json").write_text(json.dumps(recs))
        return 4
    if name == "mlvu":
        _mp4(root / "1_plotQA.mp4")
        recs = [{"video_name": "1_plotQA.mp4", "duration": 3, "question": "What colour?\n(A) red\n(B) blue\n(C) green\n(D) grey",
                 "answer": "B", "task_type": "plotQA"},
                {"video_name": "1_plotQA.mp4", "duration": 3, "question": "Which order?\n(A) a\n(B) b\n(C) c\n(D) d",
                 "answer": "D", "task_type": "order"}]
        (root / "mlvu_dev.json").write_text(json.dumps(recs))
        return 2
    if name == "longvideobench":
        _mp4(root / "videos/x.mp4")
        recs = [{"id": f"q{i}", "video_id": "x", "video_path": "x.mp4", "duration": 3.0, "duration_group": 15,
                 "question_category": cat, "question": "What is shown?", "option0": "a", "option1": "b",
                 "option2": "c", "option3": "N/A" if i else "d", "option4": "N/A", "correct_choice": i,
                 "subtitle_path": "x_en.json", "starting_timestamp_for_subtitles": 0.0}
                for i, cat in enumerate(("S2E", "T3O"))]
        (root / "lvb_val.json").write_text(json.dumps(recs))
        return 2
    if name == "lvbench":
        _mp4(root / "videos/y.mp4")
        recs = [{"uid": str(i), "key": "y", "video_path": "y.mp4", "question": "Why?\n(A) p\n(B) q\n(C) r\n(D) s",
                 "answer": "ABCD"[i], "question_type": [qt], "time_reference": ""}
                for i, qt in enumerate(("reasoning", "key information retrieval", "reasoning"))]
        (root / "lvbench.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        return 3
    if name == "perceptiontest":
        _mp4(root / "videos/video_1.mp4")
        recs = [{"video_name": "video_1", "question_id": f"video_1-{i}", "question": "What happened?",
                 "options": ["one", "two", "three"], "answer_id": i, "area": area, "reasoning": "descriptive",
                 "tag": ["x"]} for i, area in enumerate(("memory", "physics"))]
        (root / "mc_question_val.json").write_text(json.dumps(recs))
        return 2
    raise ValueError(name)


def write_export(path: Path, **overrides) -> Path:
    tok = tiny_tokenizer()
    model = tiny_chat_model(tok, seed=3, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
