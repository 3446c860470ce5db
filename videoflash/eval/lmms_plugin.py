"""videoflash as a model of lmms-eval (0.7.x): ``lmms_eval --model videoflash --model_args pretrained=<export>``.

lmms-eval finds the model through its public extension point, the entry-point group
``lmms_eval.models`` (pyproject.toml names :func:`manifest` there; lmms-eval's ``ModelRegistryV2``
loads every entry of the group when ``lmms_eval.models`` is imported). Install it with
``pip install -e ".[eval]"`` or ``make eval-venv`` (a venv of its own, docs/evaluation.md).

The class implements the three methods lmms-eval's base class requires:

- ``generate_until``: the task's context asked about the video its ``doc_to_visual`` gives (a path;
  PIL images are asked as images; nothing, text only) through ``runner.ask_video``, the call the
  offline runner makes, so the frames, visual dropout, KV compression and greedy decoding are the
  same as ``python -m videoflash.eval bench=...``; the reply is cut at the task's ``until`` strings.
- ``generate_until_multi_round``: each round's context asked with the earlier rounds as chat history
  (the video's tokens are reused across rounds), until the task's ``doc_to_text`` says stop.
- ``loglikelihood``: ``runner.continuation_logprob`` of each option after the chat prompt (tasks of
  ``output_type: multiple_choice``), returned as lmms-eval's tasks read it: its ``multiple_choice``
  scoring takes the option of the *smallest* value ("we return the actual loss"), so the value is
  the option's negative log-likelihood, summed over its tokens (``acc`` is then the most likely
  option, and ``acc_norm``, which divides by the option's length in characters, the most likely
  per character, as in lm-evaluation-harness).

``model_args`` (all optional but ``pretrained``): ``max_frames``, ``min_frames``, ``policy``
(``dynamic_fps1 | middle | fps:<rate>``), ``visual_dropout`` (``published | none | <spec>``),
``kv_compression`` (``adaretake | videox2l``), ``kv_budget``, ``dtype`` (``float32 | bfloat16 |
float16``; default bfloat16 on a GPU, float32 on the CPU), ``device`` (default ``cuda:<LOCAL_RANK>``
when there is a GPU), ``batch_size`` (1; lmms-eval's option, a conversation is asked at a time).
Data parallel: under ``accelerate launch`` or ``torchrun`` each process takes the GPU of its
``LOCAL_RANK`` and lmms-eval gives it the documents of its ``RANK``.
"""

from __future__ import annotations

import os
from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "videoflash"


def manifest() -> ModelManifest:
    """The entry point's payload: model id ``videoflash`` -> :class:`VideoFlash`."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VideoFlash")


def _passed_through(value):
    """``value`` wrapped so that lmms-eval 0.7's evaluator keeps it as it is.

    The evaluator sends every model output through ``unwrap_generation_output``, which turns what is
    neither a string nor ``(str, dict)`` into ``str(output)``: a log-likelihood ``(float, bool)`` or
    the replies of a multi-round conversation would reach the task as one string (and its
    ``process_results`` fails: "too many values to unpack"). A ``GenerationResult`` is returned
    as its ``.text``, whatever that holds."""
    try:
        from lmms_eval.api.instance import GenerationResult
    except ImportError:  # releases before GenerationResult passed outputs through untouched
        return value
    return GenerationResult(text=value)


def _opt_int(v) -> int | None:
    return None if v is None or v == "" else int(v)


def _opt_str(v) -> str | None:
    return None if v is None or v == "" else str(v)


class VideoFlash(lmms):
    """A videoflash HF export (``VideoFlashForConditionalGeneration`` and its processor) in lmms-eval."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None,
                 max_frames: int | None = None, min_frames: int | None = None, policy: str | None = None,
                 visual_dropout: str | None = None, kv_compression: str | None = None, kv_budget: int | None = None,
                 batch_size: int | str = 1, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"videoflash: unknown model_args {', '.join(sorted(kwargs))}; known: pretrained, device, "
                             "dtype, max_frames, min_frames, policy, visual_dropout, kv_compression, kv_budget, batch_size")
        if int(batch_size) != 1:
            raise ValueError(f"videoflash asks one conversation at a time: batch_size must be 1, got {batch_size}")
        kv_compression = _opt_str(kv_compression)
        if kv_compression not in (None, "adaretake", "videox2l"):
            raise ValueError(f"kv_compression must be adaretake or videox2l, got {kv_compression!r}")
        import torch

        from .runner import AskSettings, load_model

        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        cuda = torch.cuda.is_available()
        device = _opt_str(device) or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
        dtype = _opt_str(dtype) or ("bfloat16" if device.startswith("cuda") else "float32")
        self.settings = AskSettings(max_frames=_opt_int(max_frames), min_frames=_opt_int(min_frames),
                                    visual_dropout=_opt_str(visual_dropout), kv_compression=kv_compression,
                                    kv_budget=_opt_int(kv_budget))
        self.pretrained = str(pretrained)
        self._model, self.processor = load_model(self.pretrained, _opt_str(policy), self.settings.min_frames,
                                                 self.settings.max_frames, device=device, dtype=dtype)
        self._device = torch.device(device)

    # lmms-eval reads these
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return 1

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    # -- inputs -------------------------------------------------------------------------------------

    def _visual(self, doc_to_visual, doc_id, task: str, split: str) -> tuple[Any, Any]:
        """``(video, images)`` of a document: a video path (the first string ``doc_to_visual``
        gives), or PIL images, or neither."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        if not visuals:
            return None, None
        visuals = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        paths = [v for v in visuals if isinstance(v, (str, os.PathLike))]
        if paths:
            return str(paths[0]), None
        return None, visuals

    @staticmethod
    def _generation(gen_kwargs: dict) -> tuple[int | None, dict, list[str]]:
        """``(max_new_tokens, other generate arguments, stop strings)`` of a task's
        ``generation_kwargs``: greedy unless the task samples (``do_sample`` with a temperature)."""
        gen = dict(gen_kwargs or {})
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = _opt_int(gen.pop("max_new_tokens", None))
        extra: dict[str, Any] = {}
        temperature = float(gen.get("temperature") or 0.0)
        if gen.get("do_sample") and temperature > 0:
            extra.update(do_sample=True, temperature=temperature)
            if gen.get("top_p") is not None:
                extra["top_p"] = float(gen["top_p"])
        if int(gen.get("num_beams") or 1) > 1:
            extra["num_beams"] = int(gen["num_beams"])
        return max_new, extra, until

    @staticmethod
    def _cut(text: str, until: list[str]) -> str:
        for stop in until:
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        return text

    def _ask(self, context: str, gen_kwargs: dict, video, images, history=None) -> str:
        from .runner import ask_video

        max_new, extra, until = self._generation(gen_kwargs)
        reply = ask_video(self._model, self.processor, video, context, self.settings, max_new or 128, images=images,
                          history=history, **extra)
        return self._cut(reply, until)

    # -- lmms-eval's interface ---------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, desc="videoflash", disable=self._rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            video, images = self._visual(doc_to_visual, doc_id, task, split)
            out.append(self._ask(context, gen_kwargs, video, images))
        return out

    def generate_until_multi_round(self, requests) -> list:
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, desc="videoflash (multi-round)", disable=self._rank != 0):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            video, images = self._visual(doc_to_visual, doc_id, task, split)
            replies: list[str] = []
            history: list[dict] = []
            info = None
            round_idx = 0
            while True:
                if round_idx:
                    visuals, context, stop, _, info = doc_to_text(doc, previous_output=list(replies),
                                                                  round_idx=round_idx, previous_round_info=info)
                    if stop:
                        break
                    if visuals:  # a round may bring its own visual input
                        video, images = self._visual(lambda _doc, v=visuals: v, doc_id, task, split)
                reply = self._ask(context, gen_kwargs, video, images, history=history)
                history = history + [{"role": "user", "content": str(context)}, {"role": "assistant", "content": reply}]
                replies.append(reply)
                round_idx += 1
            out.append(_passed_through(list(replies)))
        return out

    def loglikelihood(self, requests) -> list:
        from tqdm.auto import tqdm

        from .runner import continuation_logprob

        out = []
        for req in tqdm(requests, desc="videoflash (log-likelihood)", disable=self._rank != 0):
            if len(req.args) == 2:  # the unconditional half of acc_mutual_info: text only
                (context, continuation), video, images = req.args, None, None
            else:
                context, continuation, doc_to_visual, doc_id, task, split = req.args
                if callable(continuation):  # output_type loglikelihood passes its doc_to_target
                    continuation = str(continuation(self.task_dict[task][split][doc_id]))
                video, images = self._visual(doc_to_visual, doc_id, task, split)
            if images is not None:
                raise NotImplementedError("videoflash scores options about a video or text, not images")
            logp, greedy = continuation_logprob(self._model, self.processor, video, context, continuation, self.settings)
            out.append(_passed_through((-logp, greedy)))
        return out
