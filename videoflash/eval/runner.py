"""The offline benchmark runner: local annotation files, no hub.

``python -m videoflash.eval bench=<name> data=<dir> model=<export dir> [out=<dir>] [key=value ...]``

Each sample (``videoflash.eval.benchmarks``) is asked with ``model.chat`` (greedy, the benchmark's
``max_new_tokens``, the processor's frame policy unless ``policy=`` / ``max_frames=`` say otherwise,
optional ``visual_dropout=`` / ``kv_compression=``), the reply is scored by the benchmark's rule, and
the record is appended to a per-rank cache ``<out>/cache/<bench>.rank<R>.jsonl`` at once: a second
run reads every rank's cache and asks only what is missing. Under ``torchrun`` (``WORLD_SIZE`` > 1)
rank R takes samples R, R+W, ...; rank 0 gathers all records after a barrier (gloo) and prints the
per-category and overall accuracy, written also to ``<out>/<bench>.json``.

``ask_video`` / ``continuation_logprob`` and ``load_model`` are what the lmms-eval plug-in
(``videoflash.eval.lmms_plugin``) shares: the same model loading, the same call, the same decoding.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from .benchmarks import Benchmark, Sample, get_benchmark, summarize


@dataclass
class AskSettings:
    """How samples are asked (all optional: the export's processor settings otherwise)."""

    max_frames: int | None = None
    min_frames: int | None = None
    max_new_tokens: int | None = None  # default: the benchmark's
    visual_dropout: str | None = None
    kv_compression: str | None = None
    kv_budget: int | None = None


def ask_video(model, processor, video, prompt: str, settings: AskSettings, max_new_tokens: int,
              start: float | None = None, end: float | None = None, images=None, history: list[dict] | None = None,
              **generation) -> str:
    """The model's reply to ``prompt`` about ``video`` (or ``images``, or neither): greedy unless
    ``generation`` says otherwise. The one call the runner and the lmms-eval plug-in make, so that
    both ask with the same frames, dropout, KV compression and decoding."""
    kv = {}
    if settings.kv_compression and video is not None:
        kv = {"kv_compression": settings.kv_compression, "kv_budget": settings.kv_budget}
    gen = {"do_sample": False, "max_new_tokens": settings.max_new_tokens or max_new_tokens, **generation}
    return model.chat(video, prompt, processor=processor, history=history, images=images,
                      max_frames=settings.max_frames, min_frames=settings.min_frames, start=start, end=end,
                      visual_dropout=settings.visual_dropout, generation_config=gen, **kv)


def ask(model, processor, bench: Benchmark, sample: Sample, settings: AskSettings) -> str:
    """The model's reply to one sample (greedy, the benchmark's ``max_new_tokens``)."""
    return ask_video(model, processor, sample.video, sample.prompt, settings, bench.max_new_tokens,
                     start=sample.start, end=sample.end)


def continuation_logprob(model, processor, video, context: str, continuation: str, settings: AskSettings,
                         start: float | None = None, end: float | None = None) -> tuple[float, bool]:
    """``(log p(continuation | prompt), whether greedy decoding would give it)`` where the prompt is
    the chat turn ``ask_video`` builds for ``context`` (same frames, same visual dropout with the
    same query token: the prompt's last one). Option scoring (lmms-eval's ``loglikelihood``).
    KV compression does not apply: the whole prompt is scored at once."""
    import torch

    from videoflash.model.inference_videoflash import _visual_inputs, visual_dropout

    tok = processor.tokenizer
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        return 0.0, True
    sampling = {"max_frames": settings.max_frames, "min_frames": settings.min_frames, "start": start, "end": end}
    visual, time_msg, _ = _visual_inputs(model, processor, video, None, sampling, 16, 64)
    prompt = processor.prompt_inputs(context, None, visual=bool(visual), time_msg=time_msg)["input_ids"]
    ids = torch.cat([prompt, torch.tensor([cont], dtype=prompt.dtype)], dim=1).to(model.device)
    visual = {k: v.to(model.device) for k, v in visual.items()}
    query = torch.tensor([prompt.shape[1] - 1], device=model.device)
    with visual_dropout(model.config, settings.visual_dropout), torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), dropout_query_positions=query,
                    logits_to_keep=len(cont) + 1, use_cache=False, **visual)
    logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
    target = torch.tensor(cont, device=logp.device)
    total = logp.gather(1, target[:, None]).sum().item()
    return float(total), bool((logp.argmax(-1) == target).all().item())


def score_record(bench: Benchmark, sample: Sample, reply: str) -> dict[str, Any]:
    pred, ok = bench.score(sample, reply)
    return {"id": sample.id, "output": reply, "pred": pred, "answer": sample.answer, "correct": bool(ok),
            "categories": dict(sample.categories)}


def read_cache(cache_dir: Path, bench: str) -> dict[str, dict]:
    """Every record cached for ``bench`` by any rank (a torn last line of a killed run is skipped)."""
    done: dict[str, dict] = {}
    for f in sorted(cache_dir.glob(f"{bench}.rank*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["id"]] = rec
    return done


def _drop_torn_tail(path: Path) -> None:
    """Cut a cache file back to its last complete line (a run killed mid-write leaves a torn one,
    and appending after it would spoil the next record)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def answer_samples(model, processor, bench: Benchmark, samples: Iterable[Sample], settings: AskSettings | None = None,
                   cache_file: str | os.PathLike | None = None, done: dict[str, dict] | None = None,
                   progress: bool = True, desc: str | None = None) -> list[dict[str, Any]]:
    """Ask and score ``samples``; records already in ``done`` are reused, new ones appended to
    ``cache_file`` as they come. Returns the records in the order of ``samples``."""
    from tqdm.auto import tqdm

    settings = settings or AskSettings()
    samples = list(samples)
    done = done or {}
    todo = [s for s in samples if s.id not in done]
    out = dict(done)
    model.eval()
    if cache_file:
        _drop_torn_tail(Path(cache_file))
    cache = open(cache_file, "a", encoding="utf-8") if cache_file else None
    try:
        bar = tqdm(total=len(todo), desc=desc or bench.name, unit="q", disable=not progress, file=sys.stderr)
        seen: set[str] = set()
        for s in todo:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                reply = ask(model, processor, bench, s, settings)
            for w in caught:  # once per kind of warning, not once per question
                key = str(w.message)[:40]
                if key not in seen:
                    seen.add(key)
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            rec = score_record(bench, s, reply)
            out[s.id] = rec
            if cache:
                cache.write(json.dumps(rec) + "\n")
                cache.flush()
            bar.update(1)
        bar.close()
    finally:
        if cache:
            cache.close()
    return [out[s.id] for s in samples]


def table(summary: dict[str, Any]) -> str:
    rows = [f"{summary['benchmark']}: {summary['correct']}/{summary['total']} = {100 * summary['accuracy']:.1f}%",
            "| axis | category | questions | accuracy |", "|---|---|---|---|"]
    for axis, vals in summary["categories"].items():
        for v, c in vals.items():
            rows.append(f"| {axis} | {v or '-'} | {c['total']} | {100 * c['accuracy']:.1f} |")
    rows.append(f"| **all** | | {summary['total']} | {100 * summary['accuracy']:.1f} |")
    return "\n".join(rows)


def load_model(export_dir: str, policy: str | None = None, min_frames: int | None = None,
               max_frames: int | None = None, device: str | None = None, dtype: str = "float32"):
    """The export's model (on ``device``: the GPU when there is one) and its processor, with the
    frame policy and frame bounds overridden where given. ``dtype``: float32, bfloat16 or float16."""
    import torch

    from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration
    from videoflash.model.processing_videoflash import VideoFlashProcessor

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    model = VideoFlashForConditionalGeneration.from_pretrained(export_dir, dtype=getattr(torch, dtype))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    overrides = {k: v for k, v in (("frame_policy", policy), ("min_frames", min_frames), ("max_frames", max_frames))
                 if v is not None}
    processor = VideoFlashProcessor.from_directory(export_dir, config=model.config, **overrides)
    return model, processor


def run(bench_name: str, data: str, model_dir: str, out: str, settings: AskSettings, policy: str | None = None,
        max_samples: int | None = None, progress: bool = True) -> dict[str, Any] | None:
    """The whole run on this rank; rank 0 returns the summary (others ``None``)."""
    bench = get_benchmark(bench_name)
    samples = bench.load(data)
    if max_samples is not None:
        samples = samples[:max_samples]
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{bench_name}: sample ids repeat in {data}; the cache needs unique ids")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out_dir = Path(out)
    cache_dir = out_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    done = read_cache(cache_dir, bench.name)
    mine = samples[rank::world]
    model, processor = load_model(model_dir, policy, settings.min_frames, settings.max_frames,
                                  device=f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if _cuda() else "cpu")
    t0 = time.perf_counter()
    n_new = sum(1 for s in mine if s.id not in done)
    answer_samples(model, processor, bench, mine, settings, cache_dir / f"{bench.name}.rank{rank}.jsonl", done,
                   progress=progress and rank == 0, desc=f"{bench.name} rank {rank}")
    elapsed = time.perf_counter() - t0
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return None
    records_by_id = read_cache(cache_dir, bench.name)
    missing = [i for i in ids if i not in records_by_id]
    if missing:
        raise RuntimeError(f"{bench_name}: {len(missing)} samples have no record after the run (first: {missing[0]})")
    records = [records_by_id[i] for i in ids]
    summary = summarize(bench, records)
    summary.update({"model": str(model_dir), "data": str(data), "settings": asdict(settings), "policy": policy,
                    "world_size": world, "new_samples_rank0": n_new,
                    "samples_per_s_rank0": (n_new / elapsed) if n_new and elapsed > 0 else None})
    with open(out_dir / f"{bench.name}.json", "w", encoding="utf-8") as f:
        json.dump({**summary, "predictions": records}, f, indent=2)
    return summary


def wandb_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """``<bench>/accuracy`` and ``<bench>/<axis>/<category>`` accuracies of a summary."""
    b = summary["benchmark"]
    out = {f"{b}/accuracy": summary["accuracy"], f"{b}/total": summary["total"]}
    for axis, vals in summary["categories"].items():
        for v, c in vals.items():
            out[f"{b}/{axis}/{v or '-'}"] = c["accuracy"]
    return out


def log_wandb(summary: dict[str, Any], out_dir: str, mode: str = "online", project: str = "videoflash-eval") -> None:
    """The scores in a wandb run (rank 0): metrics, a per-category table, the JSON as the run summary."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=project, name=f"eval-{summary['benchmark']}-{Path(str(summary['model'])).name}",
                     dir=str(out_dir), mode=mode, job_type="eval",
                     config={k: summary[k] for k in ("benchmark", "model", "data", "settings", "policy", "world_size")})
    metrics = wandb_metrics(summary)
    run.log(metrics)
    rows = [[axis, v, c["total"], c["accuracy"]] for axis, vals in summary["categories"].items() for v, c in vals.items()]
    run.log({f"{summary['benchmark']}/categories": wandb.Table(columns=["axis", "category", "questions", "accuracy"],
                                                                data=rows)})
    run.summary.update(metrics)
    run.finish()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


_INT_KEYS = {"max_frames", "min_frames", "max_new_tokens", "kv_budget", "max_samples"}
_STR_KEYS = {"bench", "data", "model", "out", "policy", "visual_dropout", "kv_compression", "wandb", "wandb_project"}


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``key=value`` arguments, typed; an unknown key or a bad value names itself."""
    opts: dict[str, Any] = {}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"expected key=value, got {arg!r}")
        k, v = arg.split("=", 1)
        if k in _INT_KEYS:
            try:
                opts[k] = int(v)
            except ValueError:
                raise SystemExit(f"{k} must be an integer, got {v!r}") from None
        elif k in _STR_KEYS:
            opts[k] = v
        else:
            raise SystemExit(f"unknown key {k!r}; known: {', '.join(sorted(_INT_KEYS | _STR_KEYS))}")
    for k in ("bench", "data", "model"):
        if k not in opts:
            raise SystemExit(f"missing {k}=...  (python -m videoflash.eval bench=<name> data=<dir> model=<export dir>)")
    if opts.get("wandb") not in (None, "online", "offline"):
        raise SystemExit(f"wandb must be online or offline, got {opts['wandb']!r}")
    if opts.get("kv_compression") not in (None, "adaretake", "videox2l"):
        raise SystemExit(f"kv_compression must be adaretake or videox2l, got {opts['kv_compression']!r}")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_overrides(sys.argv[1:] if argv is None else argv)
    try:
        get_benchmark(opts["bench"])  # fails early on an unknown name
    except ValueError as exn:
        raise SystemExit(str(exn)) from None
    settings = AskSettings(**{k: opts.get(k) for k in ("max_frames", "min_frames", "max_new_tokens", "visual_dropout",
                                                         "kv_compression", "kv_budget")})
    out = opts.get("out") or os.path.join("eval_results", opts["bench"])
    summary = run(opts["bench"], opts["data"], opts["model"], out, settings, policy=opts.get("policy"),
                  max_samples=opts.get("max_samples"))
    if summary is not None:
        print(table(summary))
        print(f"wrote {os.path.join(out, opts['bench'] + '.json')}")
        if opts.get("wandb"):
            log_wandb(summary, out, mode=opts["wandb"], project=opts.get("wandb_project", "videoflash-eval"))
    return 0
