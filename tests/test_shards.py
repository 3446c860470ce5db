"""make_shards on a mix of good and bad media: the good ones all arrive unchanged, the bad ones are
rejected with their reason, the index is right, a re-run skips finished shards, mixes follow their
sampling strategies."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import yaml

from data_tools.annotations import apply_sampling_strategy, load_mix, parse_size, read_annotation_file
from data_tools.make_shards import ShardJob, build_mix, build_shard_set, main, merge_shard_set
from tests.data_fixtures import frame_ids, index_video, png_bytes, qa, tar_record_bytes
from videoflash.data.decode import VideoDecoder


def _conv(answer="yes"):
    return qa("What is shown?", answer)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A media root and two annotation files (JSONL + JSON) mixing good and bad records."""
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    (root / "v").mkdir()
    good_video = index_video(16, 8.0, size=32)
    for i in range(4):
        (root / "v" / f"good{i}.mp4").write_bytes(good_video if i else index_video(16, 8.0, size=64))
    whole = index_video(24, 8.0, size=32, faststart=False)
    (root / "v" / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # moov at the end: cannot open
    fast = index_video(24, 8.0, size=32)
    (root / "v" / "truncated_fast.mp4").write_bytes(fast[: int(len(fast) * 0.6)])  # opens, last frames fail
    (root / "v" / "zero.mp4").write_bytes(b"")
    (root / "v" / "text.mp4").write_bytes(b"this is not a video\n" * 50)
    (root / "img").mkdir()
    (root / "img" / "a.png").write_bytes(png_bytes(40, 60, (200, 30, 30)))
    (root / "img" / "b.png").write_bytes(png_bytes(20, 20, (30, 200, 30)))
    (root / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    # a folder of frames whose names sort wrongly as text (frame_10 before frame_2)
    folder = root / "frames" / "clip"
    folder.mkdir(parents=True)
    for i in range(1, 11):
        arr = np.zeros((32, 32, 3), np.uint8)
        arr[:, :16] = 16 * ((i - 1) // 16)
        arr[:, 16:] = 16 * ((i - 1) % 16)
        Image.fromarray(arr).save(folder / f"frame_{i}.png")
    # an animated GIF, 4 frames of 250 ms
    gif = [Image.fromarray(np.full((24, 24, 3), 60 * k, np.uint8)) for k in range(4)]
    gif[0].save(root / "v" / "anim.gif", save_all=True, append_images=gif[1:], duration=250, loop=0)

    rows = [
        {"id": "g0", "video": "v/good0.mp4", "conversations": _conv()},
        {"id": "g1", "video": "v/good1.mp4", "conversations": _conv(), "start": 0.5, "end": 1.5},
        {"id": "trunc", "video": "v/truncated.mp4", "conversations": _conv()},
        {"id": "trunc_fast", "video": "v/truncated_fast.mp4", "conversations": _conv()},
        {"id": "zero", "video": "v/zero.mp4", "conversations": _conv()},
        {"id": "text", "video": "v/text.mp4", "conversations": _conv()},
        {"id": "missing", "video": "v/nope.mp4", "conversations": _conv()},
        {"id": "span", "video": "v/good2.mp4", "conversations": _conv(), "start": 30.0, "end": 40.0},
        {"id": "noanswer", "video": "v/good3.mp4", "conversations": [{"from": "human", "value": "<image>\nhi"}]},
        {"id": "frames", "video": "frames/clip", "conversations": _conv()},
        {"id": "gif", "video": "v/anim.gif", "conversations": _conv()},
        {"id": "textonly", "conversations": qa("Say hi.", "hi", visual=False)},
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, '{"id": "malformed", "video": "v/good1.mp4", "conversations": [')  # malformed JSON
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    images = [
        {"id": "img1", "image": "img/a.png", "conversations": [{"role": "user", "content": "<image>\nColor?"},
                                                                 {"role": "assistant", "content": "red"}]},
        {"id": "img2", "image": ["img/a.png", "img/b.png"], "conversations": _conv()},
        {"id": "imgbad", "image": "img/broken.jpg", "conversations": _conv()},
        {"id": "g3", "video": "v/good3.mp4", "conversations": _conv()},
    ]  # fmt: skip
    (root / "b.json").write_text(json.dumps(images))
    return root


GOOD = {"g0", "g1", "frames", "gif", "textonly", "img1", "img2", "g3"}
BAD = {
    "trunc": "bad_video",
    "trunc_fast": "bad_video",
    "zero": "empty_file",
    "text": "bad_video",
    "missing": "missing_file",
    "span": "bad_span",
    "noanswer": "bad_conversation",
    "imgbad": "bad_image",
}


@pytest.fixture(scope="module")
def built(media, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    job = ShardJob(
        annotations=[str(media / "a.jsonl"), str(media / "b.json")],
        media_root=str(media),
        out_dir=str(out),
        prefix="mix",
        shard_bytes=8 * 1024,
        frames_fps=2.0,
        workers=2,
        progress=False,
    )
    index = build_shard_set(job)
    return job, out, index


def _samples_table(out, prefix="mix"):
    with open(out / f"{prefix}-samples.jsonl") as f:
        return [json.loads(line) for line in f]


def _tar_samples(path):
    """{key: {ext: bytes}} read back with the standard library (independent of webdataset)."""
    out = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_good_arrive_bad_rejected_with_reasons(built, media):
    job, out, index = built
    samples = {}
    for sh in index["shards"]:
        got = _tar_samples(out / sh["name"])
        assert len(got) == sh["num_samples"]
        samples.update(got)
    ids = {json.loads(s["json"])["id"]: s for s in samples.values()}
    assert set(ids) == GOOD and index["total"] == len(GOOD)
    with open(out / "mix-rejects.jsonl") as f:
        rejects = [json.loads(line) for line in f]
    by_id = {r["record_id"]: r["reason"] for r in rejects if "record_id" in r}
    assert by_id == BAD
    malformed = [r for r in rejects if "record_id" not in r]
    assert len(malformed) == 1 and malformed[0]["reason"] == "bad_json" and malformed[0]["location"].endswith("a.jsonl:4")
    assert index["rejects"] == len(BAD) + 1
    assert index["reject_reasons"] == {"bad_conversation": 1, "bad_image": 1, "bad_json": 1, "bad_span": 1,
                                       "bad_video": 3, "empty_file": 1, "missing_file": 1}  # fmt: skip
    # media bytes are stored unchanged
    assert ids["g0"]["mp4"] == (media / "v" / "good0.mp4").read_bytes()
    assert ids["img1"]["png"] == (media / "img" / "a.png").read_bytes()
    assert ids["img2"]["0.png"] == (media / "img" / "a.png").read_bytes()
    assert ids["img2"]["1.png"] == (media / "img" / "b.png").read_bytes()
    assert set(ids["textonly"]) == {"json"}


def test_probed_metadata(built):
    _, out, index = built
    recs = {}
    for sh in index["shards"]:
        for key, s in _tar_samples(out / sh["name"]).items():
            recs[json.loads(s["json"])["id"]] = (key, json.loads(s["json"]), s)
    _, g0, _ = recs["g0"]
    assert (g0["media_type"], g0["num_frames"], g0["fps"], g0["duration"], g0["width"], g0["height"]) == (
        "video", 16, 8.0, 2.0, 64, 64)  # fmt: skip
    assert recs["g1"][1]["start"] == 0.5 and recs["g1"][1]["width"] == 32
    assert recs["textonly"][1]["media_type"] == "text"
    img2 = recs["img2"][1]
    assert img2["media_type"] == "image" and img2["num_images"] == 2 and img2["image_sizes"] == [[60, 40], [20, 20]]
    assert (recs["img1"][1]["width"], recs["img1"][1]["height"]) == (60, 40)
    # the samples table repeats the per-sample metadata and where each sample is; the index does not
    assert "samples" not in index
    where = {s["key"]: s for s in _samples_table(out)}
    for rid, (key, rec, _) in recs.items():
        assert where[key]["media_type"] == rec["media_type"]
        if rec["media_type"] == "video":
            assert (where[key]["num_frames"], where[key]["fps"], where[key]["duration"]) == (
                rec["num_frames"], rec["fps"], rec["duration"])  # fmt: skip
        assert where[key]["bytes"] == sum(len(v) for k, v in recs[rid][2].items() if k != "json")
        assert key in _tar_samples(out / index["shards"][where[key]["shard"]]["name"])


def test_frame_folder_and_gif_become_mp4(built):
    _, out, index = built
    recs = {}
    for sh in index["shards"]:
        for s in _tar_samples(out / sh["name"]).values():
            recs[json.loads(s["json"])["id"]] = s
    frames = recs["frames"]
    rec = json.loads(frames["json"])
    assert rec["converted_from"] == "frames" and (rec["num_frames"], rec["fps"]) == (10, 2.0)
    dec = VideoDecoder(frames["mp4"])
    assert frame_ids(dec.frames(range(10))) == list(range(10))  # numeric order: frame_1 .. frame_10
    gif = json.loads(recs["gif"]["json"])
    assert gif["converted_from"] == "gif" and (gif["num_frames"], gif["fps"]) == (4, 4.0)


def test_shard_names_and_sizes(built):
    job, out, index = built
    names = sorted(p for p in os.listdir(out) if p.endswith(".tar"))
    assert names == [f"mix-{i:06d}.tar" for i in range(index["num_shards"])]
    assert index["num_shards"] >= 2
    assert sum(s["num_samples"] for s in index["shards"]) == index["total"]
    for s in index["shards"][:-1]:  # each shard stays near the target (one sample may overflow it)
        assert s["bytes"] <= job.shard_bytes + 40 * 1024


def test_rerun_skips_finished_shards(built):
    job, out, index = built
    tars = sorted(p for p in os.listdir(out) if p.endswith(".tar"))
    before = {p: os.stat(out / p).st_mtime_ns for p in tars}
    again = build_shard_set(job)
    assert {p: os.stat(out / p).st_mtime_ns for p in tars} == before
    assert again == index
    # a shard without its completion marker is rebuilt, and only that one
    os.remove(out / (tars[1] + ".done.json"))
    build_shard_set(job)
    after = {p: os.stat(out / p).st_mtime_ns for p in tars}
    assert [p for p in tars if after[p] != before[p]] == [tars[1]]
    # a set made before offsets files gets them from its tars, without a shard rebuilt
    offsets = {p: (out / (p + ".offsets.npy")).read_bytes() for p in tars}
    for p in tars:
        os.remove(out / (p + ".offsets.npy"))
    build_shard_set(job)
    assert {p: os.stat(out / p).st_mtime_ns for p in tars} == after
    assert {p: (out / (p + ".offsets.npy")).read_bytes() for p in tars} == offsets


def test_sampling_strategies_by_hand():
    r = list(range(10))
    assert apply_sampling_strategy(r, "all") == r
    assert apply_sampling_strategy(r, "first:3") == [0, 1, 2]
    assert apply_sampling_strategy(r, "first:25%") == [0, 1, 2]  # ceil(2.5)
    assert apply_sampling_strategy(r, "first2:25%") == [3, 4, 5]  # the second chunk of 3
    assert apply_sampling_strategy(r, "first4:3") == [9]
    assert apply_sampling_strategy(r, "end:2") == [8, 9]
    assert apply_sampling_strategy(r, "end:10%") == [9]
    with pytest.raises(ValueError):
        apply_sampling_strategy(r, "random:10")
    with pytest.raises(ValueError):
        apply_sampling_strategy(r, "middle:10")
    assert parse_size("512MB") == 512 << 20 and parse_size("1.5k") == 1536 and parse_size(100) == 100


def test_read_annotation_file_json_and_jsonl(media):
    recs, rej = read_annotation_file(str(media / "a.jsonl"))
    assert len(recs) == 12 and len(rej) == 1 and rej[0].reason == "bad_json"
    recs, rej = read_annotation_file(str(media / "b.json"))
    assert [r["id"] for _, r in recs] == ["img1", "img2", "imgbad", "g3"] and not rej


def test_mix_yaml(media, tmp_path):
    from videoflash.data.pipeline import load_sources, resolve_sources

    mix = {
        "datasets": [
            {"json_path": str(media / "a.jsonl"), "data_root": str(media), "sampling_strategy": "first:2", "name": "vids"},
            {"json_path": str(media / "b.json"), "data_root": str(media), "sampling_strategy": "end:1"},
        ]
    }  # fmt: skip
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(mix))
    assert [e.prefix for e in load_mix(str(path))] == ["vids", "b"]
    sources = build_mix(str(path), str(tmp_path / "out"), workers=1, progress=False)
    assert [(s["name"], s["num_samples"]) for s in sources] == [("vids", 2), ("b", 1)]
    resolved = resolve_sources(load_sources(str(tmp_path / "out" / "sources.yaml")))
    assert [(r.name, r.num_samples, len(r.urls)) for r in resolved] == [("vids", 2, 1), ("b", 1, 1)]
    ids = [json.loads(s["json"])["id"] for s in _tar_samples(tmp_path / "out" / "vids-000000.tar").values()]
    assert sorted(ids) == ["g0", "g1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{"json_path": "x.json", "sampling_strategy": "random:5"}]))
    with pytest.raises(ValueError):
        load_mix(str(bad))


def test_cli(media, tmp_path, capsys):
    rc = main(["--annotations", str(media / "b.json"), "--media-root", str(media), "--out", str(tmp_path),
               "--prefix", "imgs", "--workers", "1"])  # fmt: skip
    assert rc == 0
    assert "3 samples in 1 shards, 1 rejected" in capsys.readouterr().out
    with open(tmp_path / "imgs-index.json") as f:
        assert json.load(f)["total"] == 3


def test_offsets_files_locate_every_sample(built):
    # independent expectation (tarfile's member list): a sample starts at its first member's header
    # and takes its members' headers and 512-byte data blocks
    _, out, index = built
    for sh in index["shards"]:
        path = out / sh["name"]
        with tarfile.open(path) as tf:
            firsts = {}
            for m in tf.getmembers():
                firsts.setdefault(m.name.split(".", 1)[0], m.offset)
        offsets = np.load(str(path) + ".offsets.npy")
        assert offsets.dtype == np.int64 and offsets.shape == (sh["num_samples"], 2)
        sizes = tar_record_bytes(str(path))
        assert [tuple(r) for r in offsets.tolist()] == [(firsts[k], sizes[k]) for k in firsts]
        data = path.read_bytes()
        for (start, length), (key, members) in zip(offsets.tolist(), _tar_samples(path).items()):
            with tarfile.open(fileobj=io.BytesIO(data[start : start + length])) as tf:
                assert {m.name: tf.extractfile(m).read() for m in tf} == {f"{key}.{e}": v for e, v in members.items()}


def _set_files(out, prefix):
    """Every file of a set, by name, with its bytes (done files hold no time stamps)."""
    return {p: (out / p).read_bytes() for p in sorted(os.listdir(out)) if p.startswith(prefix)}


def test_parts_merge_into_the_same_set_as_one_run(media, tmp_path):
    def job(out, part=(0, 1)):
        return ShardJob(annotations=[str(media / "a.jsonl"), str(media / "b.json")], media_root=str(media),
                        out_dir=str(out), prefix="mix", shard_bytes=8 * 1024, frames_fps=2.0, workers=1,
                        progress=False, part=part)  # fmt: skip

    whole = build_shard_set(job(tmp_path / "one"))
    assert whole["num_shards"] >= 3
    for i in (2, 0):  # parts run in any order, each builds only its own shards and writes no index
        got = build_shard_set(job(tmp_path / "three", (i, 3)))
        assert got["shards"] == list(range(i, whole["num_shards"], 3))
        assert not (tmp_path / "three" / "mix-index.json").exists()
    with pytest.raises(RuntimeError, match="mix-000001.tar"):  # part 1 is missing
        merge_shard_set(job(tmp_path / "three"))
    build_shard_set(job(tmp_path / "three", (1, 3)))
    assert merge_shard_set(job(tmp_path / "three")) == whole
    assert _set_files(tmp_path / "three", "mix") == _set_files(tmp_path / "one", "mix")


def test_cli_parts_and_merge(media, tmp_path, capsys):
    args = ["--annotations", str(media / "b.json"), "--media-root", str(media), "--out", str(tmp_path),
            "--prefix", "imgs", "--workers", "1", "--shard-size", "1k"]  # fmt: skip
    assert main(args + ["--part", "1/2"]) == 0
    assert main(args + ["--merge"]) == 2 and "imgs-000000.tar" in capsys.readouterr().err
    assert main(args + ["--part", "0/2"]) == 0
    assert main(args + ["--merge"]) == 0
    assert "3 samples in 4 shards, 1 rejected" in capsys.readouterr().out  # a shard of one reject is empty
    with pytest.raises(SystemExit):
        main(args + ["--part", "2/2"])


MALFORMED = [
    # (id, media fields, words the message must hold)
    ("v_empty", {"video": ""}, ["'video'", "empty path"]),
    ("v_blank", {"video": "  "}, ["'video'", "empty path"]),
    ("v_list", {"video": ["v.mp4"]}, ["'video'", "one path", "list"]),
    ("v_null", {"video": None}, ["'video'", "null"]),
    ("v_int", {"video": 7}, ["'video'", "one path", "int"]),
    ("v_root", {"video": "."}, ["'video'", "media root"]),
    ("v_root2", {"video": "sub/.."}, ["'video'", "media root"]),
    ("i_empty", {"image": ""}, ["'image'", "empty path"]),
    ("i_list_empty", {"image": [""]}, ["'image'[0]", "empty path"]),
    ("i_no_paths", {"image": []}, ["'image'", "non-empty list"]),
    ("i_mixed", {"image": ["a.png", 3]}, ["'image'[1]", "int"]),
    ("i_none_entry", {"image": ["a.png", None]}, ["'image'[1]", "NoneType"]),
    ("i_null", {"image": None}, ["'image'", "null"]),
    ("i_dict", {"image": {"path": "a.png"}}, ["'image'", "dict"]),
]


def test_malformed_media_fields_are_bad_records(tmp_path):
    # the media root itself looks like a folder of frames: a record that pointed at it would make a
    # video of it instead of being rejected
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    for k in range(1, 4):
        (root / f"frame_{k}.png").write_bytes(png_bytes(16, 16))
    (root / "a.png").write_bytes(png_bytes(16, 16))
    (root / "v.mp4").write_bytes(index_video(16, 8.0, size=32))
    rows = [{"id": rid, **fields, "conversations": _conv()} for rid, fields, _ in MALFORMED]
    rows.append({"id": "ok_video", "video": "v.mp4", "conversations": _conv()})
    rows.append({"id": "ok_images", "image": ["a.png", "a.png"], "conversations": _conv()})
    (tmp_path / "ann.json").write_text(json.dumps(rows))
    job = ShardJob(annotations=[str(tmp_path / "ann.json")], media_root=str(root), out_dir=str(tmp_path / "out"),
                   prefix="m", workers=1, progress=False)  # fmt: skip
    index = build_shard_set(job)
    assert index["total"] == 2 and index["reject_reasons"] == {"bad_record": len(MALFORMED)}
    with open(tmp_path / "out" / "m-rejects.jsonl") as f:
        rejects = {r["record_id"]: r for r in map(json.loads, f)}
    assert set(rejects) == {rid for rid, _, _ in MALFORMED}
    for rid, _, words in MALFORMED:
        assert rejects[rid]["reason"] == "bad_record"
        for w in words:
            assert w in rejects[rid]["message"], (rid, rejects[rid]["message"])
