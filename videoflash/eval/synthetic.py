"""Answer accuracy on the held-out questions of the synthetic corpus (``data_tools.synth_videos``).

Every held-out record carries its ``task``, its ``answer`` and the answer ``choices``. A sample is
prepared as the training loader prepares it (the same frame policy and decode size, the placeholder
and time message, the tokenizer's chat template), the prompt ends with the assistant header, and the
model answers by greedy decoding. The answer counts when the generated text, lower-cased and without
surrounding spaces and punctuation, equals the expected answer. The chance level of a task is
1 / (its number of choices): what answering uniformly at random among the choices scores.

``python -m videoflash.eval <export dir> --heldout data/synthetic/heldout.jsonl`` prints the table.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from videoflash.data.conversation import normalize_conversation, place_placeholder, time_message
from videoflash.data.decode import VideoDecoder, decode_image, image_tiles
from videoflash.data.sampling import frame_indices, span_to_frames

_STRIP = string.whitespace + string.punctuation


def normalize_answer(text: str) -> str:
    return text.strip(_STRIP).lower()


@dataclass
class TaskScore:
    correct: int = 0
    total: int = 0
    chance: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class EvalResult:
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(t.total for t in self.tasks.values())

    @property
    def accuracy(self) -> float:
        return sum(t.correct for t in self.tasks.values()) / max(1, self.total)

    @property
    def chance(self) -> float:
        """Expected accuracy of uniform guessing over the same questions."""
        return sum(t.chance * t.total for t in self.tasks.values()) / max(1, self.total)

    def table(self) -> str:
        rows = ["| task | questions | accuracy | chance |", "|---|---|---|---|"]
        for name, t in sorted(self.tasks.items()):
            rows.append(f"| {name} | {t.total} | {t.accuracy:.3f} | {t.chance:.3f} |")
        rows.append(f"| **all** | {self.total} | {self.accuracy:.3f} | {self.chance:.3f} |")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "chance": self.chance,
            "total": self.total,
            "tasks": {k: {"correct": v.correct, "total": v.total, "accuracy": v.accuracy, "chance": v.chance}
                      for k, v in self.tasks.items()},
        }


@dataclass(frozen=True)
class FrameSettings:
    """How a sample's frames are taken (the trained stage's settings)."""

    image_size: int
    policy: str = "dynamic_fps1"
    min_frames: int = 4
    max_frames: int = 8
    frames_per_clip: int = 4
    image_mode: str = "square"
    max_grid: int = 6


def load_records(path: str | os.PathLike, max_samples: int | None = None) -> list[dict]:
    records = []
    with open(path) as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
    if max_samples is not None:
        records = records[:max_samples]
    return records


def prepare(record: dict, media_root: Path, tokenizer, fs: FrameSettings) -> dict[str, Any]:
    """Prompt ids and visual inputs of one held-out record (its answer left out)."""
    frames = tiles = None
    grid = (0, 0)
    tmsg = None
    if record.get("video"):
        dec = VideoDecoder((media_root / record["video"]).read_bytes(), size=fs.image_size)
        start, end = record.get("start"), record.get("end")
        first, stop = span_to_frames(dec.num_frames, dec.fps, start, end)
        idx = frame_indices(dec.num_frames, dec.fps, fs.policy, fs.min_frames, fs.max_frames,
                            start=start, end=end, local_num_frames=fs.frames_per_clip)
        frames = dec.frames(idx)
        tmsg = time_message((stop - first) / dec.fps, len(idx))
    elif record.get("image"):
        names = record["image"] if isinstance(record["image"], list) else [record["image"]]
        images = [decode_image((media_root / n).read_bytes()) for n in names]
        tiles, grid = image_tiles(images, fs.image_size, fs.image_mode, fs.max_grid)
    messages = normalize_conversation(record["conversations"])
    last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = place_placeholder(messages[:last_answer], frames is not None or tiles is not None, tmsg)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {"input_ids": ids, "frames": frames, "tiles": tiles, "grid": grid}


def _batch(items: list[dict], pad_id: int, image_size: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts (generation appends on the right) and the visual inputs of contracts §1."""
    longest = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, longest - n :] = torch.tensor(it["input_ids"])
        mask[i, longest - n :] = 1
    empty = torch.zeros((0, image_size, image_size, 3), dtype=torch.uint8)
    frames = [it["frames"] for it in items if it["frames"] is not None]
    tiles = [it["tiles"] for it in items if it["tiles"] is not None]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values_videos": torch.cat(frames) if frames else empty,
        "video_frame_counts": torch.tensor([0 if it["frames"] is None else len(it["frames"]) for it in items]),
        "pixel_values_images": torch.cat(tiles) if tiles else empty,
        "image_tile_counts": torch.tensor([0 if it["tiles"] is None else len(it["tiles"]) for it in items]),
        "image_grids": torch.tensor([list(it["grid"]) for it in items], dtype=torch.long),
    }


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def evaluate(model, tokenizer, heldout: str | os.PathLike, fs: FrameSettings, *, batch_size: int = 16,
             max_new_tokens: int = 8, max_samples: int | None = None, progress: bool = True) -> EvalResult:
    """Greedy answers to the held-out questions; exact match against the known answers."""
    from tqdm.auto import tqdm

    heldout = Path(heldout)
    records = load_records(heldout, max_samples)
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = eos if isinstance(eos, int) and eos != tokenizer.unk_token_id else tokenizer.eos_token_id
    result = EvalResult()
    bar = tqdm(total=len(records), desc="eval", unit="q", disable=not progress)
    for chunk in _chunks(records, batch_size):
        items = [prepare(r, heldout.parent, tokenizer, fs) for r in chunk]
        batch = {k: v.to(device) for k, v in _batch(items, tokenizer.pad_token_id, fs.image_size).items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for rec, text in zip(chunk, texts):
            choices = rec.get("choices") or []
            score = result.tasks.setdefault(rec.get("task", "all"), TaskScore(chance=1.0 / len(choices) if choices else 0.0))
            ok = normalize_answer(text) == normalize_answer(str(rec["answer"]))
            score.correct += int(ok)
            score.total += 1
            result.predictions.append({"id": rec.get("id"), "task": rec.get("task"), "answer": rec["answer"],
                                       "output": text, "correct": ok, "duration": rec.get("duration")})
        bar.update(len(chunk))
    bar.close()
    return result


def load_export(export_dir: str | os.PathLike, image_size: int | None = None):
    """(model, tokenizer) of an HF export (``from_pretrained``, float32, on the GPU when there is one).
    ``image_size`` other than the export's builds the encoder at that size (its position table
    resized, as stage 4 starts at the high resolution), so the model takes frames of that size."""
    from transformers import AutoTokenizer

    from videoflash.model.configuration_videoflash import VideoFlashConfig
    from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration

    config = VideoFlashConfig.from_pretrained(export_dir)
    if image_size is not None and int(image_size) != config.image_size:
        config.vision_config["image_size"] = int(image_size)
    model = VideoFlashForConditionalGeneration.from_pretrained(export_dir, config=config, dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.cuda()
    return model, AutoTokenizer.from_pretrained(export_dir)


def evaluate_export(export_dir: str | os.PathLike, heldout: str | os.PathLike, fs: FrameSettings | None = None,
                    **kwargs) -> EvalResult:
    """Load an HF export and evaluate it with ``fs`` (default: the export's own frame size); the
    encoder runs at ``fs.image_size`` (:func:`load_export`)."""
    model, tokenizer = load_export(export_dir, fs.image_size if fs is not None else None)
    if fs is None:
        cfg = model.config
        fs = FrameSettings(image_size=cfg.image_size, frames_per_clip=cfg.frames_per_clip, max_grid=cfg.max_grid)
    return evaluate(model, tokenizer, heldout, fs, **kwargs)
