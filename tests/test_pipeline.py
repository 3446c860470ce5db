"""The WebDataset loader on real tar shards with real DataLoader workers: the batch contract, bad
samples counted and skipped, disjoint ranks x workers, equal batch counts, and exact resume."""

import json
import tarfile

import pytest
import torch

from tests.data_fixtures import frame_ids, index_video, png_bytes, qa, record, tokenizer, write_index, write_tar  # noqa: F401
from videoflash.data import DataSource, LoaderConfig, build_loader
from videoflash.data.collate import BATCH_KEYS
from videoflash.data.shards import write_offsets
from videoflash.data.tokenizer import IMAGE_TOKEN

S = 32  # frame / tile size of every test


def vid(key, n=16, fps=8.0, **extra):
    return {"__key__": key, "json": record(key, "video", **extra), "mp4": index_video(n, fps, 32)}


def img(key, shapes=((40, 60),), **extra):
    s = {"__key__": key, "json": record(key, "image", media_files=[f"{k}.png" for k in range(len(shapes))], **extra)}
    for k, (h, w) in enumerate(shapes):
        s[f"{k}.png"] = png_bytes(h, w, (200, 30, 30))
    return s


def txt(key):
    return {"__key__": key, "json": record(key, "text")}


def make_set(tmp_path, prefix, shards, offsets=True):
    """Write shards (lists of samples), their index and (unless ``offsets=False``, as in shard sets
    made before index format 2) their offsets files; return the brace pattern."""
    for i, samples in enumerate(shards):
        path = write_tar(str(tmp_path / f"{prefix}-{i:06d}.tar"), samples)
        if offsets:
            write_offsets(path)
    write_index(str(tmp_path), prefix, [len(s) for s in shards])
    return str(tmp_path / f"{prefix}-{{000000..{len(shards) - 1:06d}}}.tar")


def cfg(pattern, **kw):
    base = dict(
        sources=[DataSource(pattern)],
        image_size=S,
        frame_policy="dynamic_fps1",
        min_frames=4,
        max_frames=16,
        tokens_per_frame=2,
        tokens_per_image=3,
        max_tokens_per_batch=400,
        max_batch_size=8,
        batches_per_epoch=4,
        num_workers=2,
        shuffle_buffer=4,
        seed=1,
    )
    base.update(kw)
    return LoaderConfig(**base)


def take(loader, n=None):
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


# -- the batch contract ---------------------------------------------------------------------------

# dynamic_fps1 in [4, 16], by hand: 16 frames @ 8 fps (2 s) -> 4 frames: linspace(0,16,5) -> 1 5 9 13;
# 40 frames (5 s) -> 4: linspace(0,40,5) -> 4 14 24 34; 24 frames, span [1 s, 3 s) = frames [8, 24)
# -> 16 frames -> 9 13 17 21; 136 frames (17 s) -> 16 = 4*floor(17/4): linspace(0,136,17) step 8.5
EXPECTED_FRAMES = {
    "v16": ([1, 5, 9, 13], 2.0),
    "v40": ([4, 14, 24, 34], 5.0),
    "v24span": ([9, 13, 17, 21], 2.0),
    "v136": ([int(8.5 * i) + (int(8.5 * (i + 1)) - 1 - int(8.5 * i)) // 2 for i in range(16)], 17.0),
}


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    shards = [
        [vid("v16"), img("anyres"), txt("t1")],
        [vid("v40", 40), img("multi", ((40, 60), (20, 20))), vid("v24span", 24, start=1.0, end=3.0)],
        [vid("v136", 136), txt("t2")],
    ]
    return make_set(d, "mixed", shards)


def _check_batch(b, tok, c):
    assert list(b) == list(BATCH_KEYS)
    B, L = b["input_ids"].shape
    for k in ("input_ids", "attention_mask", "labels"):
        assert b[k].dtype == torch.long and b[k].shape == (B, L)
    for k in ("pixel_values_videos", "pixel_values_images"):
        assert b[k].dtype == torch.uint8 and b[k].shape[1:] == (S, S, 3)
    assert b["video_frame_counts"].sum() == b["pixel_values_videos"].shape[0]
    assert b["image_tile_counts"].sum() == b["pixel_values_images"].shape[0]
    assert b["image_grids"].shape == (B, 2) and len(b["keys"]) == len(b["sources"]) == B
    assert (b["video_frame_counts"] % 4 == 0).all()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    lengths = []
    for i in range(B):
        n = int(b["attention_mask"][i].sum())
        assert (b["attention_mask"][i, :n] == 1).all() and (b["attention_mask"][i, n:] == 0).all()
        assert (b["input_ids"][i, n:] == tok.pad_token_id).all() and (b["labels"][i, n:] == -100).all()
        ids = b["input_ids"][i, :n]
        visual = int(b["video_frame_counts"][i]) + int(b["image_tile_counts"][i]) > 0
        assert int((ids == image_id).sum()) == (1 if visual else 0)
        assert (b["labels"][i][b["input_ids"][i] == image_id] == -100).all()
        sup = b["labels"][i, :n] != -100
        assert sup.any() and (b["labels"][i, :n][sup] == ids[sup]).all()
        # never both video and images
        assert int(b["video_frame_counts"][i]) == 0 or int(b["image_tile_counts"][i]) == 0
        nvis = 2 * int(b["video_frame_counts"][i]) + 3 * int(b["image_tile_counts"][i])
        assert int(b["num_visual_tokens"][i]) == nvis
        assert int(b["num_text_tokens"][i]) == n - (1 if visual else 0)
        lengths.append(nvis + n - (1 if visual else 0))
    assert B * max(lengths) <= c.max_tokens_per_batch  # the token budget (padded)
    return lengths


def test_batch_contract_frames_images_text(mixed_set, tokenizer):
    c = cfg(mixed_set, image_mode="anyres", batches_per_epoch=6, max_tokens_per_batch=300)
    loader = build_loader(c, tokenizer)
    seen = {}
    for b in take(loader):
        _check_batch(b, tokenizer, c)
        fo = to = 0
        for i, key in enumerate(b["keys"]):
            nf, nt = int(b["video_frame_counts"][i]), int(b["image_tile_counts"][i])
            frames = b["pixel_values_videos"][fo : fo + nf]
            tiles = b["pixel_values_images"][to : to + nt]
            fo, to = fo + nf, to + nt
            n = int(b["attention_mask"][i].sum())
            text = tokenizer.decode(b["input_ids"][i, :n])
            seen[key] = (frames, tiles, tuple(b["image_grids"][i].tolist()), text)
            assert b["sources"][i] == "mixed"
    assert set(seen) == {"v16", "v40", "v24span", "v136", "anyres", "multi", "t1", "t2"}
    for key, (idx, duration) in EXPECTED_FRAMES.items():
        frames, tiles, grid, text = seen[key]
        assert frame_ids(frames) == idx, key
        assert f"<image>\nThe video lasts for {duration:.2f} seconds, and {len(idx)} frames are uniformly sampled from it. What color" in text
        assert tiles.shape[0] == 0 and grid == (0, 0)
    # a 40x60 image, tile 32, grid up to 6x6: the smallest canvas holding it whole is 2x2 tiles
    frames, tiles, grid, text = seen["anyres"]
    assert grid == (2, 2) and tiles.shape[0] == 1 + 4 and frames.shape[0] == 0
    assert (tiles.float().mean(dim=(1, 2)) - torch.tensor([200.0, 30.0, 30.0])).abs().max() < 3
    assert "<image>\nWhat color" in text and "video lasts" not in text
    _, tiles, grid, _ = seen["multi"]
    assert grid == (0, 0) and tiles.shape[0] == 2
    _, tiles, grid, text = seen["t1"]
    assert tiles.shape[0] == 0 and IMAGE_TOKEN not in text


def test_square_image_mode_and_plain_format(mixed_set, tokenizer):
    c = cfg(mixed_set, image_mode="square", conversation_format="plain", batches_per_epoch=4, num_workers=0)
    for b in take(build_loader(c, tokenizer)):
        _check_batch(b, tokenizer, c)
        for i, key in enumerate(b["keys"]):
            if key == "anyres":
                assert int(b["image_tile_counts"][i]) == 1 and b["image_grids"][i].tolist() == [0, 0]
            n = int(b["attention_mask"][i].sum())
            text = tokenizer.decode(b["input_ids"][i, :n])
            assert text.endswith("red\n") and "<|im_start|>" not in text


# -- bad samples ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory):
    """4 shards, each: its bad samples first, then 3 good videos."""
    d = tmp_path_factory.mktemp("bad")
    whole = index_video(24, 8.0, 32, faststart=False)
    fast = index_video(24, 8.0, 32, faststart=True)
    bad = [
        [{"__key__": "trunc", "json": record("trunc", "video"), "mp4": whole[: len(whole) // 2]},
         {"__key__": "zero", "json": record("zero", "video"), "mp4": b""}],
        [{"__key__": "notvideo", "json": record("notvideo", "video"), "mp4": b"not a video" * 40},
         {"__key__": "badjson", "json": b'{"id": "badjson", "conversations": [', "mp4": index_video(16, 8.0, 32)}],
        [{"__key__": "nomedia", "json": record("nomedia", "video")},
         {"__key__": "noanswer", "json": json.dumps({"media_type": "video", "conversations": qa()[:1]}).encode(),
          "mp4": index_video(16, 8.0, 32)}],
        [{"__key__": "truncfast", "json": record("truncfast", "video"), "mp4": fast[: int(len(fast) * 0.6)]},
         {"__key__": "span", "json": record("span", "video", start=50.0, end=60.0), "mp4": index_video(16, 8.0, 32)}],
    ]  # fmt: skip
    shards = [b + [vid(f"s{i}g{k}") for k in range(3)] for i, b in enumerate(bad)]
    return make_set(d, "bad", shards)


EXPECTED_SKIPS = {
    "bad_video": 3,  # truncated (no moov), not a video, truncated with moov first (last frames missing)
    "empty_media": 1,
    "bad_json": 1,
    "missing_media": 1,
    "bad_conversation": 1,
    "bad_span": 1,
}


def test_bad_samples_are_counted_and_skipped(bad_set, tokenizer):
    # batch size 1, no shuffle: each of the 2 streams reads its 2 shards once and emits their 6 good
    # samples; every bad sample sits before the good ones of its shard, so all are met exactly once
    c = cfg(bad_set, max_batch_size=1, shuffle_buffer=1, batches_per_epoch=12, num_workers=2)
    loader = build_loader(c, tokenizer)
    batches = take(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert len(batches) == len(loader) == 12
    assert sorted(keys) == sorted(f"s{i}g{k}" for i in range(4) for k in range(3))
    skips = loader.skip_counts()
    assert skips["by_reason"] == EXPECTED_SKIPS and skips["total"] == 8
    assert skips["by_shard"] == {
        "bad-000000.tar": {"bad_video": 1, "empty_media": 1},
        "bad-000001.tar": {"bad_video": 1, "bad_json": 1},
        "bad-000002.tar": {"missing_media": 1, "bad_conversation": 1},
        "bad-000003.tar": {"bad_video": 1, "bad_span": 1},
    }


def test_every_rank_yields_the_same_number_of_batches(bad_set, tokenizer):
    counts = []
    for rank in range(2):
        c = cfg(bad_set, batches_per_epoch=5, num_workers=1, shuffle_buffer=2, max_tokens_per_batch=150)
        loader = build_loader(c, tokenizer, rank=rank, world_size=2)
        counts.append(len(take(loader)))
    assert counts == [5, 5]


def test_never_hangs_on_a_shard_of_junk(tmp_path, tokenizer):
    junk = [[{"__key__": f"j{i}", "json": record(f"j{i}", "video"), "mp4": b"junk" * 10} for i in range(4)]]
    pattern = make_set(tmp_path, "junk", junk)
    c = cfg(pattern, num_workers=1, max_consecutive_errors=6)
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        take(build_loader(c, tokenizer))


# -- ranks x workers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("eight")
    return make_set(d, "eight", [[vid(f"r{i}_{k}", 16 + 8 * k) for k in range(3)] for i in range(8)])


def test_two_ranks_two_workers_disjoint_and_complete(eight_shards, tokenizer):
    # 8 shards over 2 ranks x 2 workers: 2 shards (6 samples) per stream; 6 batches of 1 per stream
    # without shuffle read exactly one pass: every sample once, over all ranks and workers together
    per_rank = []
    for rank in range(2):
        c = cfg(eight_shards, max_batch_size=1, shuffle_buffer=1, batches_per_epoch=12, num_workers=2)
        batches = take(build_loader(c, tokenizer, rank=rank, world_size=2))
        assert len(batches) == 12
        per_rank.append([k for b in batches for k in b["keys"]])
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == len(set(everything)) == 24
    assert set(everything) == {f"r{i}_{k}" for i in range(8) for k in range(3)}
    # each worker's share is whole shards: its batches alternate in the round robin
    for keys in per_rank:
        w0, w1 = keys[0::2], keys[1::2]
        assert not {k.split("_")[0] for k in w0} & {k.split("_")[0] for k in w1}


def test_fewer_shards_than_streams_split_by_units(tmp_path, tokenizer):
    # 2 shards of 6, units of 3 samples: 4 units for 4 streams; each stream reads its unit only
    pattern = make_set(tmp_path, "two", [[vid(f"a{k}") for k in range(6)], [vid(f"b{k}") for k in range(6)]])
    seen = []
    for rank in range(2):
        c = cfg(pattern, max_batch_size=1, shuffle_buffer=1, unit_samples=3, batches_per_epoch=6, num_workers=2)
        loader = build_loader(c, tokenizer, rank=rank, world_size=2)
        keys = [k for b in take(loader) for k in b["keys"]]
        # each worker's share is whole units: 3 consecutive samples of one shard, in order
        for w in (keys[0::2], keys[1::2]):
            assert len({k[0] for k in w}) == 1 and [int(k[1]) for k in w] in ([0, 1, 2], [3, 4, 5])
        seen += keys
    assert sorted(seen) == sorted([f"a{k}" for k in range(6)] + [f"b{k}" for k in range(6)])


def test_disjoint_with_shuffling(eight_shards, tokenizer):
    # with a shuffle buffer of 3, 3 batches of 1 per stream pull at most 5 of the stream's 6 samples
    seen = []
    for rank in range(2):
        c = cfg(eight_shards, max_batch_size=1, shuffle_buffer=3, batches_per_epoch=6, num_workers=2, seed=7)
        seen += [k for b in take(build_loader(c, tokenizer, rank=rank, world_size=2)) for k in b["keys"]]
    assert len(seen) == 12 and len(set(seen)) == 12


def test_stream_order_is_a_function_of_seed_and_rank(eight_shards, tokenizer):
    def keys(rank, seed):
        c = cfg(eight_shards, unit_samples=2, batches_per_epoch=4, num_workers=2, seed=seed)
        return [k for b in take(build_loader(c, tokenizer, rank=rank, world_size=2)) for k in b["keys"]]

    a = keys(0, 5)
    assert a == keys(0, 5)
    assert a != keys(1, 5) and a != keys(0, 6)


def test_two_sources_with_weights(tmp_path, eight_shards, tokenizer):
    other = make_set(tmp_path, "other", [[txt(f"o{k}") for k in range(6)] for _ in range(2)])
    c = cfg(eight_shards, batches_per_epoch=16, num_workers=2, max_batch_size=4, max_tokens_per_batch=10_000,
            sources=[DataSource(eight_shards, weight=1.0), DataSource(other, name="text", weight=0.0)])  # fmt: skip
    srcs = [s for b in take(build_loader(c, tokenizer)) for s in b["sources"]]
    assert set(srcs) == {"eight"}  # weight 0: never drawn
    c.sources = [DataSource(eight_shards, weight=0.0), DataSource(other, name="text", weight=1.0)]
    srcs = [s for b in take(build_loader(c, tokenizer)) for s in b["sources"]]
    assert set(srcs) == {"text"}
    c.sources = [DataSource(eight_shards), DataSource(other, name="text", weight=4.0)]
    srcs = [s for b in take(build_loader(c, tokenizer)) for s in b["sources"]]
    # sizes 24 and 12, weights 1 and 4: the text source has 2/3 of the draws
    assert 0.45 < srcs.count("text") / len(srcs) < 0.9


# -- exact resume ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resume_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    shards = []
    for i in range(5):
        s = [vid(f"m{i}_{k}", [16, 40, 24, 136][(i + k) % 4]) for k in range(4)]
        s.insert(2, {"__key__": f"bad{i}", "json": record(f"bad{i}", "video"), "mp4": b"\x00" * 64})
        s.append(txt(f"t{i}"))
        shards.append(s)
    pattern = make_set(d, "res", shards, offsets=False)
    # damaged shards of a set made before offsets files: a garbage header before the last sample;
    # the walk over the tar headers stops there, and the sample the index promised but the tar did not
    # give is counted (missing_in_tar)
    for i in range(5):
        path = d / f"res-{i:06d}.tar"
        data = bytearray(path.read_bytes())
        with tarfile.open(path) as tf:
            offset = tf.getmembers()[-1].offset
        data[offset : offset + 512] = b"\x07" * 512
        path.write_bytes(bytes(data))
    return pattern


def _fingerprint(b):
    return (
        tuple(b["keys"]),
        tuple(b["input_ids"].flatten().tolist()),
        int(b["pixel_values_videos"].to(torch.int64).sum()),
        tuple(b["video_frame_counts"].tolist()),
    )


def resumed_run(config, tokenizer, fingerprint, total: int, cut: int):
    """``total`` batch fingerprints of a loader stopped after ``cut`` batches, its state saved
    (through JSON, as a checkpoint would) and loaded by a new loader that reads on; and that loader."""
    first = build_loader(config(), tokenizer)
    got = []
    while len(got) < cut:
        for b in first:
            got.append(fingerprint(b))
            if len(got) == cut:
                break
    state = json.loads(json.dumps(first.state_dict()))
    del first
    second = build_loader(config(), tokenizer)
    second.load_state_dict(state)
    while len(got) < total:
        for b in second:
            got.append(fingerprint(b))
            if len(got) == total:
                break
    return got, second


def test_resume_equivalence(resume_set, tokenizer):
    def config():
        return cfg(resume_set, batches_per_epoch=5, num_workers=2, shuffle_buffer=3, max_tokens_per_batch=120)

    ref_loader = build_loader(config(), tokenizer)
    assert len(ref_loader) == 6  # rounded up to a multiple of the 2 workers
    reference = [_fingerprint(b) for _ in range(3) for b in ref_loader]  # three epochs
    assert len(reference) == 18
    assert len({r[0] for r in reference}) > 6  # batches differ (shuffled, variable size)
    ref_skips = ref_loader.skip_counts()
    assert ref_skips["by_reason"].get("bad_video", 0) > 0 and ref_skips["by_reason"].get("missing_in_tar", 0) > 0
    for cut in (1, 3, 6, 7, 11):
        got, second = resumed_run(config, tokenizer, _fingerprint, len(reference), cut)
        assert got == reference, f"resumed after {cut} batches"
        assert second.skip_counts() == ref_skips


def test_resume_state_must_match_the_loader(resume_set, tokenizer):
    a = build_loader(cfg(resume_set, num_workers=2), tokenizer)
    take(a, 1)
    state = a.state_dict()
    b = build_loader(cfg(resume_set, num_workers=1), tokenizer)
    with pytest.raises(ValueError, match="num_workers"):
        b.load_state_dict(state)
    c = build_loader(cfg(resume_set, num_workers=2), tokenizer, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        c.load_state_dict(state)


def test_config_validation(mixed_set, tokenizer):
    with pytest.raises(ValueError, match="max_frames"):
        build_loader(cfg(mixed_set, max_frames=10), tokenizer)
    with pytest.raises(ValueError, match="frame policy"):
        build_loader(cfg(mixed_set, frame_policy="everything"), tokenizer)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        build_loader(cfg(mixed_set, samples_per_epoch=0), tokenizer)
    with pytest.raises(ValueError, match="unit_samples"):
        build_loader(cfg(mixed_set, unit_samples=0), tokenizer)
    with pytest.raises(ValueError, match="rank"):
        build_loader(cfg(mixed_set), tokenizer, rank=2, world_size=2)


def test_too_long_samples_are_skipped(mixed_set, tokenizer):
    # 16 frames x 2 tokens + text > 60: v136 never fits
    c = cfg(mixed_set, max_sample_tokens=60, max_tokens_per_batch=400, batches_per_epoch=4, num_workers=0)
    loader = build_loader(c, tokenizer)
    keys = {k for b in take(loader) for k in b["keys"]}
    assert "v136" not in keys
    assert loader.skip_counts()["by_reason"].get("too_long", 0) >= 1
