"""Decoder isolation: real files that crash decord (tests/data) cost one sample, in make_shards and in
the loader; dead or hung child processes are replaced and nothing hangs.

Run by tests/test_isolation.py in a fresh interpreter: whether decord segfaults on a given damaged
file depends on the state of the process it runs in (in a long pytest session that had decoded and
exported many models before, one of the kept files was rejected cleanly instead), and the loader's
decode child is forked from that process. A fresh process crashes on these files every time.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_tools.make_shards import _run
from tests.data_fixtures import index_video, png_bytes, qa, record, tokenizer  # noqa: F401
from tests.test_pipeline import _fingerprint, cfg, make_set, take, vid
from videoflash.data import build_loader
from videoflash.data.decode import MediaError
from videoflash.data.isolation import CRASH, TIMEOUT, Isolated, IsolationError, result_area, run_ordered

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
CRASHERS = {"decord_segv_4.mp4": "SIGSEGV", "decord_segv_36.mp4": "SIGSEGV", "decord_abort_726.mp4": "SIGABRT"}


def _fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_decoder", ROOT / "scripts" / "fuzz_decoder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def crashers():
    """{name: bytes} of the kept crashing files, after checking in a bare forked child (the fuzzer's,
    no isolation code involved) that each one still kills decord with its signal."""
    fuzz = _fuzzer()
    out = {}
    for name, sig in CRASHERS.items():
        data = (DATA / name).read_bytes()
        got, _ = fuzz.run_one(data, timeout=30)
        if got != sig:
            pytest.skip(f"{name} no longer crashes this decord ({got}); find new files with scripts/fuzz_decoder.py")
        out[name] = data
    return out


def _children() -> set[int]:
    """Live child processes of this process (from /proc)."""
    pids = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


# -- the supervised child ---------------------------------------------------------------------------


def _task(kind, n=3):
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        time.sleep(3600)
    if kind == "media":
        raise MediaError("bad_video", "not a video")
    return np.arange(n, dtype=np.int64), os.getpid()


def test_isolated_crash_timeout_exception_and_replacement(crashers):
    before = _children()
    from videoflash.data.decode import VideoDecoder

    def decode(data):
        return VideoDecoder(data, size=32, backend="decord").num_frames  # the crashers are decord's

    w = Isolated(decode, timeout=20, name="decoder")
    good = index_video(16, 8.0, 32)
    assert w.call(good) == 16
    for name, sig in CRASHERS.items():
        with pytest.raises(IsolationError) as got:
            w.call(crashers[name])
        assert got.value.reason == CRASH and f"killed by {sig}" in str(got.value)
        assert w.call(good) == 16  # a fresh child took over
    assert w.starts == 1 + len(CRASHERS)
    w.close()

    t = Isolated(_task, timeout=0.5, name="worker")
    arr, pid = t.call("ok", 10**6)
    assert arr.shape == (10**6,) and arr[-1] == 10**6 - 1 and pid != os.getpid()
    with pytest.raises(MediaError) as media:  # the task's own exception comes back as it was raised
        t.call("media")
    assert media.value.reason == "bad_video" and t.call("ok")[1] == pid  # and the child lives on
    t0 = time.monotonic()
    with pytest.raises(IsolationError) as hung:
        t.call("hang")
    assert hung.value.reason == TIMEOUT and time.monotonic() - t0 < 10
    with pytest.raises(IsolationError, match="killed by SIGKILL"):
        t.call("sigkill")
    pid = t.call("ok")[1]
    assert pid not in (None, os.getpid())
    os.kill(pid, signal.SIGKILL)  # killed from outside while idle: the next task is not lost for it
    time.sleep(0.2)
    assert t.call("ok")[1] != pid
    t.close()
    assert _children() == before  # every child reaped


def test_results_through_the_shared_area():
    # arrays that fit come back through the shared mapping, equal to the pipe's; a larger one takes
    # the pipe; a crash and a timeout replace the child (and its area) as without it
    t = Isolated(_task, timeout=2.0, name="worker", shared_bytes=8 * 1000)
    for n in (1, 999, 1000, 1001, 10**5, 3):
        arr, pid = t.call("ok", n)
        assert arr.dtype == np.int64 and np.array_equal(arr, np.arange(n)) and pid != os.getpid()
        arr[0] = -1  # the caller's own copy: writable, and the next task cannot overwrite it
    kept = t.call("ok", 1000)[0]
    t.call("ok", 999)
    assert np.array_equal(kept, np.arange(1000))
    with pytest.raises(IsolationError, match="killed by SIGKILL"):
        t.call("sigkill")
    with pytest.raises(IsolationError) as hung:
        t.call("hang")
    assert hung.value.reason == TIMEOUT
    assert np.array_equal(t.call("ok", 500)[0], np.arange(500)) and t.starts == 3
    t.close()


def _in_area(kind, n):
    """A result built in the child's shared area (``result_area``): ``inplace`` one array there, as
    the loader's decode does; ``misplaced`` a small array first, then an array at the area's start,
    where the small one would be copied; ``none`` asks for more than the area holds."""
    area = result_area(8 * n)
    if kind == "none":
        return area is None, os.getpid()
    arr = area.view(np.int64)
    arr[:] = np.arange(n) * 7
    if kind == "misplaced":
        return (np.full(5, -3, np.int64), arr), os.getpid()
    return arr, os.getpid()


def test_results_built_in_the_shared_area():
    # the worked values: 7 * arange(n), written where they travel; nothing the next task writes
    # reaches a result already returned; in the caller's process there is no area
    assert result_area(8) is None
    t = Isolated(_in_area, timeout=5.0, name="worker", shared_bytes=8 * 1000)
    kept, pid = t.call("inplace", 1000)
    assert np.array_equal(kept, np.arange(1000) * 7) and pid != os.getpid()
    small, big = t.call("misplaced", 600)[0]  # the area path would overwrite big's start with small
    assert np.array_equal(small, np.full(5, -3)) and np.array_equal(big, np.arange(600) * 7)
    assert t.call("none", 1001)[0] is True
    t.call("inplace", 10)
    assert np.array_equal(kept, np.arange(1000) * 7)
    allocated = []
    u = Isolated(_in_area, timeout=5.0, name="worker", shared_bytes=8 * 100,
                 alloc=lambda n: allocated.append(np.empty(n, np.uint8)) or allocated[-1])  # fmt: skip
    arr = u.call("inplace", 100)[0]
    assert np.array_equal(arr, np.arange(100) * 7)
    assert arr.__array_interface__["data"][0] == allocated[0].__array_interface__["data"][0]  # copied out there
    t.close()
    u.close()


def test_probe_run_replaces_killed_and_hung_workers():
    # 12 tasks over 2 workers: task 2 SIGKILLs its worker, task 5 hangs past the timeout, task 7
    # raises; every other task is answered, in order, by a live (replacement) worker
    kinds = ["ok"] * 12
    kinds[2], kinds[5], kinds[7] = "sigkill", "hang", "media"
    before = _children()
    for workers in (1, 2):
        t0 = time.monotonic()
        got = list(_run([(k, i) for i, k in enumerate(kinds)], workers, 1.0, probe=lambda t: _task(*t)))
        assert time.monotonic() - t0 < 30
        assert [type(g).__name__ for g in got] == [
            "IsolationError" if k in ("sigkill", "hang") else "MediaError" if k == "media" else "tuple" for k in kinds
        ]
        assert got[2].reason == CRASH and "SIGKILL" in str(got[2]) and got[5].reason == TIMEOUT
        assert [g[0].shape[0] for i, g in enumerate(got) if kinds[i] == "ok"] == [i for i, k in enumerate(kinds) if k == "ok"]
        assert len({g[1] for g in got if isinstance(g, tuple)}) >= 2  # served by replacement children too
        assert _children() == before


def test_run_ordered_keeps_order_with_uneven_tasks():
    delays = [0.2, 0.0, 0.1, 0.0, 0.05, 0.0, 0.0, 0.15]

    def slow(i):
        time.sleep(delays[i])
        return i

    assert list(run_ordered(slow, [(i,) for i in range(8)], 3, timeout=10)) == list(range(8))


# -- make_shards --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_media(tmp_path_factory, crashers):
    """Good videos, an image, a text record, the three crashers and a frame folder whose third frame
    is a FIFO nobody writes to (its probe hangs in open())."""
    root = tmp_path_factory.mktemp("crash_media")
    rows = []
    for i in range(3):
        (root / f"good{i}.mp4").write_bytes(index_video(16 + 8 * i, 8.0, 32))
        rows.append({"id": f"good{i}", "video": f"good{i}.mp4", "conversations": qa()})
    for name in CRASHERS:
        (root / name).write_bytes(crashers[name])
        rows.append({"id": name.split(".")[0], "video": name, "conversations": qa()})
    (root / "a.png").write_bytes(png_bytes(20, 30))
    rows.append({"id": "img", "image": "a.png", "conversations": qa()})
    rows.append({"id": "text", "conversations": qa("Say hi.", "hi", visual=False)})
    folder = root / "stuck"
    folder.mkdir()
    for k in (1, 2, 4):
        (folder / f"frame_{k}.png").write_bytes(png_bytes(16, 16))
    os.mkfifo(folder / "frame_3.png")
    rows.append({"id": "stuck", "video": "stuck", "conversations": qa()})
    rows.insert(4, rows.pop())  # the hang in the middle, between good ones
    (root / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("workers", [2, 1])
def test_make_shards_rejects_crashers_and_hangs(crash_media, tmp_path, workers):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_tools.make_shards", "--annotations", str(crash_media / "ann.jsonl"),
           "--media-root", str(crash_media), "--out", str(out), "--prefix", "c", "--workers", str(workers),
           "--max-samples-per-shard", "3", "--probe-timeout", "12", "--video-backend", "decord"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((out / "c-index.json").read_text())
    import tarfile

    ids = set()
    for sh in index["shards"]:
        with tarfile.open(out / sh["name"]) as tf:
            ids |= {json.loads(tf.extractfile(m).read())["id"] for m in tf.getmembers() if m.name.endswith(".json")}
    rejects = {r["record_id"]: r for r in map(json.loads, (out / "c-rejects.jsonl").read_text().splitlines())}
    assert ids == {"good0", "good1", "good2", "img", "text"} and index["total"] == 5, rejects
    assert set(rejects) == {"decord_segv_4", "decord_segv_36", "decord_abort_726", "stuck"}
    for name, sig in CRASHERS.items():
        r = rejects[name.split(".")[0]]
        assert r["reason"] == "decoder_crash" and f"killed by {sig}" in r["message"] and r["media"].endswith(name)
    assert rejects["stuck"]["reason"] == "decoder_timeout"
    assert index["reject_reasons"] == {"decoder_crash": 3, "decoder_timeout": 1}


# -- the loader ---------------------------------------------------------------------------------------


def _crash_sample(key, data):
    return {"__key__": key, "json": record(key, "video"), "mp4": data}


@pytest.fixture(scope="module")
def crash_set(tmp_path_factory, crashers):
    """4 shards of 4 good videos with a crasher in the middle of each (the last shard two)."""
    d = tmp_path_factory.mktemp("crash_set")
    names = list(CRASHERS)
    shards = []
    for i in range(4):
        s = [vid(f"c{i}_{k}", 16 + 8 * k) for k in range(4)]
        s.insert(2, _crash_sample(f"x{i}", (DATA / names[i % 3]).read_bytes()))
        if i == 3:
            s.insert(4, _crash_sample("x3b", (DATA / names[0]).read_bytes()))
        shards.append(s)
    return make_set(d, "crash", shards)


GOOD_KEYS = {f"c{i}_{k}" for i in range(4) for k in range(4)}


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_counts_crashes_and_yields_every_batch(crash_set, tokenizer, workers):
    # batch size 1, no shuffle: one pass over the 4 shards gives the 16 good videos, 5 crashes
    c = cfg(crash_set, max_batch_size=1, shuffle_buffer=1, batches_per_epoch=16, num_workers=workers,
            video_backend="decord")  # fmt: skip
    loader = build_loader(c, tokenizer)
    batches = take(loader)
    assert len(batches) == len(loader) == 16
    assert sorted(k for b in batches for k in b["keys"]) == sorted(GOOD_KEYS)
    skips = loader.skip_counts()
    assert skips["by_reason"] == {"decoder_crash": 5}
    assert skips["by_shard"] == {f"crash-00000{i}.tar": {"decoder_crash": 2 if i == 3 else 1} for i in range(4)}


def test_every_rank_yields_its_batches_over_crashers(crash_set, tokenizer):
    # 2 ranks x 1 worker: each rank's stream reads 2 of the 4 shards (8 good videos, 2 or 3 crashers)
    keys, crashes = [], 0
    for rank in range(2):
        c = cfg(crash_set, max_batch_size=1, shuffle_buffer=1, batches_per_epoch=8, num_workers=1, video_backend="decord")
        loader = build_loader(c, tokenizer, rank=rank, world_size=2)
        batches = take(loader)
        assert len(batches) == 8
        keys += [k for b in batches for k in b["keys"]]
        crashes += loader.skip_counts()["by_reason"]["decoder_crash"]
    assert sorted(keys) == sorted(GOOD_KEYS) and crashes == 5


def test_resume_before_a_crasher_skips_it_again(crash_set, tokenizer):
    def config():
        return cfg(crash_set, max_batch_size=1, shuffle_buffer=1, batches_per_epoch=16, num_workers=2,
                   video_backend="decord")  # fmt: skip

    ref_loader = build_loader(config(), tokenizer)
    reference = [_fingerprint(b) for b in ref_loader]
    ref_skips = ref_loader.skip_counts()
    assert ref_skips["by_reason"] == {"decoder_crash": 5}
    for cut in (2, 5):  # each stream has emitted 1 (2) of its batches: its next crasher lies ahead
        first = build_loader(config(), tokenizer)
        got = [_fingerprint(b) for b in take(first, cut)]
        state = json.loads(json.dumps(first.state_dict()))
        assert sum(first.skip_counts()["by_reason"].values()) < 5
        del first
        second = build_loader(config(), tokenizer)
        second.load_state_dict(state)
        got += [_fingerprint(b) for b in second]
        assert got == reference, f"resumed after {cut} batches"
        assert second.skip_counts() == ref_skips


@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
def test_loader_decode_timeout_skips_the_video(tmp_path, tokenizer, backend):
    # a deadline far shorter than any decode: every video times out (its child killed and replaced),
    # the text samples between them still make the batches; the same supervision holds whichever
    # library decodes in the child
    from tests.test_pipeline import txt
    from videoflash.model.video_io import torchcodec_problem

    if backend == "torchcodec" and torchcodec_problem():
        pytest.skip(torchcodec_problem())
    pattern = make_set(tmp_path, "slow", [[vid("v0"), txt("t0"), vid("v1"), txt("t1"), vid("v2"), txt("t2")]])
    c = cfg(pattern, max_batch_size=1, shuffle_buffer=1, batches_per_epoch=3, num_workers=0, decode_timeout_s=1e-6,
            video_backend=backend)  # fmt: skip
    loader = build_loader(c, tokenizer)
    assert [k for b in take(loader) for k in b["keys"]] == ["t0", "t1", "t2"]
    assert loader.skip_counts()["by_reason"] == {"decoder_timeout": 3}


def test_inline_decoding_dies_on_a_crasher(crash_set, tokenizer):
    """Without isolation the same loader dies by the file's signal: what the default prevents."""
    code = (
        "import sys; sys.path.insert(0, '.')\n"
        "from tests.test_pipeline import cfg, take\n"
        "from videoflash.data import build_loader\n"
        "from videoflash.data.tokenizer import build_chatml_tokenizer\n"
        f"c = cfg({crash_set!r}, max_batch_size=1, shuffle_buffer=1, batches_per_epoch=16, num_workers=0,"
        " decode_isolation='inline', video_backend='decord')\n"
        "take(build_loader(c, build_chatml_tokenizer()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=300)
    assert proc.returncode in (-signal.SIGSEGV, -signal.SIGABRT), proc.stderr[-2000:]
