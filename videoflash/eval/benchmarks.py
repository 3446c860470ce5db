"""Published video benchmarks: their annotation formats, prompts and answer extraction.

One :class:`Benchmark` per benchmark turns the published annotation records (as lmms-eval's task
YAMLs read them) into :class:`Sample` objects: the video path, an optional clip span, the prompt
text the task asks with (question, lettered options, post-prompt), the expected answer letter and
the categories the benchmark reports over. ``Benchmark.extract(text, sample)`` turns the model's
reply into a letter by the benchmark's rule in lmms-eval; ``score(sample, text)`` says whether it
counts. The offline runner (``videoflash.eval.runner``) and the lmms-eval plug-in both use these,
so the two give the same answers for the same replies.

Local layout of ``data=<dir>`` (the published files, unchanged):

- mvbench: ``<dir>/json/<sub_task>.json`` (lists of ``video, question, candidates, answer`` and
  optionally ``start, end`` in seconds); videos under ``<dir>/video/<folder of the sub-task>/`` or
  ``<dir>/<folder>/`` (lmms-eval's folder table) or ``<dir>/video/``.
- videomme: ``<dir>/videomme.json[l]`` or ``<dir>/*.json[l]`` records of ``videoID, question_id,
  duration, domain, sub_category, task_type, question, options ["A. ...", ...], answer``; videos
  ``<dir>/data/<videoID>.mp4`` (also ``.MP4`` / ``.mkv``) or ``<dir>/videos/``.
- mlvu (``mlvu_dev``): records of ``video_name, question`` (options already in it), ``answer``
  (a letter), ``task_type``; videos ``<dir>/<video_name>`` or ``<dir>/video/<video_name>``.
- longvideobench (``longvideobench_val_v``): records of ``id, video_path, question,
  option0..option4`` ("N/A" when absent), ``correct_choice`` (an index), ``duration_group``,
  ``question_category``; videos ``<dir>/videos/<video_path>``.
- lvbench: records of ``video_path, question`` (options may be inside it or in ``options``),
  ``answer`` (a letter), ``question_type`` (a list or a string); videos ``<dir>/<video_path>`` or
  ``<dir>/videos/<video_path>``.
- perceptiontest (``perceptiontest_val_mc``): records of ``video_name, question_id, question,
  options`` (three), ``answer_id`` (an index), ``area, reasoning, tag``; videos
  ``<dir>/videos/<video_name>.mp4``.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

LETTERS = string.ascii_uppercase

#: The post-prompt VideoChat-Flash's evaluation ends multiple-choice prompts with (§6.1).
MC_POST_PROMPT = "Answer with the option's letter from the given choices directly."

#: Greedy decoding lengths of VideoChat-Flash's evaluation (§6.1).
MAX_NEW_TOKENS = {"mvbench": 16, "videomme": 16, "mlvu": 16, "lvbench": 16, "longvideobench": 32,
                  "perceptiontest": 16}


@dataclass
class Sample:
    """One question of a benchmark, ready to ask."""

    benchmark: str
    id: str
    video: str  # absolute path
    prompt: str
    answer: str  # the expected letter
    choices: list[str]  # the option letters
    categories: dict[str, str] = field(default_factory=dict)  # axis -> value (e.g. task_type -> "TR")
    start: float | None = None
    end: float | None = None


# --------------------------------------------------------------------------------------------------
# answer extraction (the rules of lmms-eval's task utils, re-stated)
# --------------------------------------------------------------------------------------------------

# The prefix list of lmms-eval's VideoMME / MLVU extractor. Two pairs of its entries lack the comma
# between them, so Python joins them into one string ("The best option isThe correct option is",
# "Best answer:Best option:"): a reply starting with "The best option is" keeps those words. We keep
# that behaviour, since the aim is to score as lmms-eval does.
_VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                      "The best option isThe correct option is", "Best answer:Best option:")
_LVB_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                 "The best option is", "The correct option is", "Best answer:", "Best option:")


def extract_letter_videomme(text: str, letters: str = "ABCD") -> str:
    """VideoMME / MLVU / LVBench rule: drop the known answer prefixes; a reply of more than ten words
    without any capital option letter is no answer; otherwise the first capital option letter found
    anywhere (also inside a word); ``""`` when there is none."""
    s = text.strip()
    for p in _VIDEOMME_PREFIXES:
        s = s.replace(p, "")
    m = re.search(f"[{letters}]", s)
    if m is None:
        return ""
    return m.group(0)


def extract_letter_longvideobench(text: str, choices: list[str], rng: random.Random) -> str:
    """LongVideoBench rule: as VideoMME's with the full prefix list and letters A-E; a reply with no
    letter gets a random choice (the benchmark's authors' rule; ``rng`` makes it reproducible)."""
    s = text.strip()
    for p in _LVB_PREFIXES:
        s = s.replace(p, "")
    m = re.search("[ABCDE]", s)
    if m is None:
        return rng.choice(choices)
    return m.group(0)


_MVB_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!"]


def _mvbench_normalise(text: str) -> str:
    """MVBench's normalisation of a reply or a gold letter: ``"X. ..."`` gives ``X``; otherwise the
    VQA punctuation handling, then the first stand-alone letter A-E (case-insensitive), else the
    normalised text itself."""
    m = re.match(r"^([A-E])\.\s*(.+)$", text.strip(), re.IGNORECASE)
    if m:
        return m.group(1).upper()
    s = text.replace("\n", " ").replace("\t", " ").strip()
    comma_digits = re.search(r"(\d)(,)(\d)", s) is not None
    out = s
    for p in _MVB_PUNCT:
        if (p + " " in s or " " + p in s) or comma_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = re.sub(r"(?!<=\d)(\.)(?!\d)", "", out)
    out = out.strip("'").strip('"').strip(")").strip("(").strip().lower()
    m = re.search(r"\b([A-E])\b", out, re.IGNORECASE)
    return m.group(1).upper() if m else out


def extract_letter_perceptiontest(text: str) -> str:
    """PerceptionTest (generation) rule: the reply must be exactly ``A``, ``B`` or ``C``."""
    return text if text in ("A", "B", "C") else ""


# --------------------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------------------


def _read_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):  # {"data": [...]} or {id: record}
        data = data.get("data", list(data.values()))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of annotation records")
    return data


def _annotation_files(root: Path, preferred: tuple[str, ...]) -> list[Path]:
    for name in preferred:
        if (root / name).is_file():
            return [root / name]
    files = sorted(p for p in root.glob("*.json*") if p.suffix in (".json", ".jsonl"))
    if not files:
        raise FileNotFoundError(f"no annotation file (*.json / *.jsonl) in {root}")
    return files


def _find_video(root: Path, candidates: list[str], what: str) -> str:
    for c in candidates:
        p = root / c
        if p.is_file():
            return str(p)
    for c in candidates:
        if (root / c).is_dir():
            raise ValueError(f"{what}: {root / c} is a folder of frames; the runner reads video files only "
                             "(encode the frames to an mp4 of the same name)")
    raise FileNotFoundError(f"{what}: video not found (looked for {', '.join(str(root / c) for c in candidates)})")


def _checked_records(f, keys: tuple[str, ...]):
    """``(i, record, where)`` for each record of annotation file ``f``, after checking it has ``keys``."""
    for i, rec in enumerate(_read_records(f)):
        where = f"{f}[{i}]"
        _require(rec, keys, where)
        yield i, rec, where


def _require(rec: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ValueError(f"{where}: annotation record lacks {', '.join(missing)}")


#: MVBench's sub-task -> video folder (as lmms-eval's mvbench task lays the videos out).
MVBENCH_FOLDERS = {
    "object_interaction": "star/Charades_segment", "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment", "action_localization": "sta/sta_video_segment",
    "moving_count": "clevrer/video_validation", "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos", "object_shuffle": "perception/videos",
    "egocentric_navigation": "vlnqa", "moving_direction": "clevrer/video_validation",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment", "fine_grained_action": "Moments_in_Time_Raw/videos",
    "scene_transition": "scene_qa/video", "state_change": "perception/videos",
    "moving_attribute": "clevrer/video_validation", "action_antonym": "ssv2_video_mp4",
    "unexpected_action": "FunQA_test/test", "counterfactual_inference": "clevrer/video_validation",
    "object_existence": "clevrer/video_validation", "action_count": "perception/videos",
}


class Benchmark:
    name: str = ""
    #: the category axes the benchmark reports over
    axes: tuple[str, ...] = ()
    letters: str = "ABCD"

    def load(self, root: str | os.PathLike) -> list[Sample]:
        raise NotImplementedError

    def extract(self, text: str, sample: Sample) -> str:
        return extract_letter_videomme(text, self.letters)

    def score(self, sample: Sample, text: str) -> tuple[str, bool]:
        pred = self.extract(text, sample)
        return pred, pred == sample.answer

    @property
    def max_new_tokens(self) -> int:
        return MAX_NEW_TOKENS[self.name]


class MVBench(Benchmark):
    name, axes, letters = "mvbench", ("sub_task",), "ABCDE"

    def prompt(self, rec: dict) -> str:
        opts = "".join(f"({LETTERS[i]}) {c}\n" for i, c in enumerate(rec["candidates"]))
        return "Question:" + rec["question"] + "\nOption:\n" + opts + MC_POST_PROMPT

    def load(self, root):
        root = Path(root)
        jdir = root / "json"
        files = sorted(jdir.glob("*.json")) if jdir.is_dir() else []
        if not files:
            raise FileNotFoundError(f"mvbench: no sub-task files {jdir}/<sub_task>.json")
        out = []
        for f in files:
            task = f.stem
            folder = MVBENCH_FOLDERS.get(task, task)
            for i, rec, where in _checked_records(f, ("video", "question", "candidates", "answer")):
                if rec["answer"] not in rec["candidates"]:
                    raise ValueError(f"{where}: answer {rec['answer']!r} is not among the candidates")
                video = _find_video(root, [f"video/{folder}/{rec['video']}", f"{folder}/{rec['video']}",
                                           f"video/{rec['video']}", rec["video"]], where)
                n = len(rec["candidates"])
                out.append(Sample("mvbench", f"{task}/{i}", video, self.prompt(rec),
                                  LETTERS[rec["candidates"].index(rec["answer"])], list(LETTERS[:n]),
                                  {"sub_task": task}, rec.get("start"), rec.get("end")))
        return out

    def extract(self, text, sample):
        return _mvbench_normalise(text)

    def score(self, sample, text):
        pred = self.extract(text, sample)
        return pred, pred == _mvbench_normalise(sample.answer)


class VideoMME(Benchmark):
    name, axes = "videomme", ("duration", "domain", "task_type")

    def prompt(self, rec: dict) -> str:
        head = ("Select the best answer to the following multiple-choice question based on the video. "
                "Respond with only the letter (A, B, C, or D) of the correct option.")
        return head + "\n" + rec["question"] + "\n" + "\n".join(rec["options"]) + "\n" + MC_POST_PROMPT

    def load(self, root):
        root = Path(root)
        out = []
        for f in _annotation_files(root, ("videomme.json", "videomme.jsonl", "test.jsonl")):
            for i, rec, where in _checked_records(f, ("videoID", "question", "options", "answer")):
                vid = rec["videoID"]
                video = _find_video(root, [f"data/{vid}.mp4", f"data/{vid}.MP4", f"data/{vid}.mkv",
                                           f"videos/{vid}.mp4", f"{vid}.mp4"], where)
                out.append(Sample("videomme", str(rec.get("question_id", f"{vid}-{i}")), video, self.prompt(rec),
                                  rec["answer"], list("ABCD"),
                                  {a: str(rec.get(a, "")) for a in self.axes}))
        return out


class MLVU(Benchmark):
    name, axes = "mlvu", ("task_type",)

    def prompt(self, rec: dict) -> str:
        return "\n" + rec["question"] + "\nOnly give the best option.\n" + "\n" + "Best option: ("

    def load(self, root):
        root = Path(root)
        out = []
        for f in _annotation_files(root, ("mlvu_dev.json", "mlvu_dev.jsonl", "mlvu.json", "mlvu.jsonl")):
            for i, rec, where in _checked_records(f, ("video_name", "question", "answer", "task_type")):
                video = _find_video(root, [rec["video_name"], f"video/{rec['video_name']}",
                                           f"videos/{rec['video_name']}"], where)
                out.append(Sample("mlvu", str(rec.get("question_id", f"{rec['video_name']}-{i}")), video,
                                  self.prompt(rec), rec["answer"], list("ABCD"), {"task_type": rec["task_type"]}))
        return out


class LongVideoBench(Benchmark):
    name, axes, letters = "longvideobench", ("duration_group", "question_category"), "ABCDE"

    @staticmethod
    def options(rec: dict) -> list[str]:
        opts = []
        for i in range(5):
            o = rec.get(f"option{i}", "N/A")
            if o == "N/A":
                break
            opts.append(o)
        return opts

    def prompt(self, rec: dict) -> str:
        opts = self.options(rec)
        q = rec["question"] + "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(opts))
        return f"{q}\n{MC_POST_PROMPT}\n"

    def load(self, root):
        root = Path(root)
        out = []
        for f in _annotation_files(root, ("lvb_val.json", "lvb_val.jsonl", "validation.jsonl")):
            for i, rec, where in _checked_records(f, ("id", "video_path", "question", "option0", "correct_choice")):
                video = _find_video(root, [f"videos/{rec['video_path']}", rec["video_path"]], where)
                n = len(self.options(rec))
                out.append(Sample("longvideobench", str(rec["id"]), video, self.prompt(rec),
                                  LETTERS[int(rec["correct_choice"])], list(LETTERS[:n]),
                                  {a: str(rec.get(a, "")) for a in self.axes}))
        return out

    def extract(self, text, sample):
        # a fixed seed per sample: the same reply always gets the same fallback letter
        return extract_letter_longvideobench(text, sample.choices, random.Random(f"lvb:{sample.id}"))


class LVBench(Benchmark):
    name, axes = "lvbench", ("question_type",)

    def prompt(self, rec: dict) -> str:
        q = rec["question"]
        if rec.get("options"):
            q += "\n" + "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(rec["options"]))
        return q + "\nAnswer the question with the option letter."

    def load(self, root):
        root = Path(root)
        out = []
        for f in _annotation_files(root, ("lvbench.json", "lvbench.jsonl")):
            for i, rec, where in _checked_records(f, ("video_path", "question", "answer")):
                video = _find_video(root, [rec["video_path"], f"videos/{rec['video_path']}"], where)
                qt = rec.get("question_type", "")
                qt = qt[0] if isinstance(qt, list) and qt else qt
                out.append(Sample("lvbench", str(rec.get("uid", rec.get("key", f"{rec['video_path']}-{i}"))), video,
                                  self.prompt(rec), rec["answer"], list("ABCD"), {"question_type": str(qt)}))
        return out


class PerceptionTest(Benchmark):
    name, axes = "perceptiontest", ("area", "reasoning")

    def prompt(self, rec: dict) -> str:
        q = rec["question"] + "".join(f"\n{LETTERS[min(i, 2)]}. {o}" for i, o in enumerate(rec["options"]))
        return q + "\n" + MC_POST_PROMPT

    def load(self, root):
        root = Path(root)
        out = []
        for f in _annotation_files(root, ("mc_question_val.json", "mc_question_val.jsonl", "val.jsonl")):
            for i, rec, where in _checked_records(f, ("video_name", "question", "options", "answer_id")):
                video = _find_video(root, [f"videos/{rec['video_name']}.mp4", f"videos/{rec['video_name']}.MP4",
                                           f"{rec['video_name']}.mp4"], where)
                out.append(Sample("perceptiontest", str(rec.get("question_id", f"{rec['video_name']}-{i}")), video,
                                  self.prompt(rec), LETTERS[int(rec["answer_id"])], list("ABC"),
                                  {a: str(rec.get(a, "")) for a in self.axes}))
        return out

    def extract(self, text, sample):
        return extract_letter_perceptiontest(text)


BENCHMARKS: dict[str, Callable[[], Benchmark]] = {
    b.name: b for b in (MVBench, VideoMME, MLVU, LongVideoBench, LVBench, PerceptionTest)
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]()


def summarize(bench: Benchmark, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall and per-category accuracy of scored records (``{"correct": bool, "categories": {...}}``)."""
    cats: dict[str, dict[str, dict[str, int]]] = {a: {} for a in bench.axes}
    for r in records:
        for axis, value in r["categories"].items():
            c = cats.setdefault(axis, {}).setdefault(value, {"correct": 0, "total": 0})
            c["correct"] += int(r["correct"])
            c["total"] += 1
    total = len(records)
    correct = sum(int(r["correct"]) for r in records)
    return {
        "benchmark": bench.name,
        "total": total,
        "correct": correct,
        "accuracy": correct / total if total else 0.0,
        "categories": {axis: {v: {**c, "accuracy": c["correct"] / c["total"]} for v, c in sorted(vals.items())}
                       for axis, vals in cats.items()},
    }
