"""Packing in the loader, on real tar shards and DataLoader workers: rows follow the next-fit rule
over the stream's own order (computed here from the unpacked stream), every sample of an epoch
appears exactly once, and a resumed loader yields the same rows."""

from __future__ import annotations


import pytest
import torch

from tests.data_fixtures import tokenizer  # noqa: F401
from tests.test_pipeline import _fingerprint, cfg, img, make_set, resumed_run, take, txt, vid
from videoflash.data import build_loader
from videoflash.data.collate import PACKED_BATCH_KEYS, Sample, collate, collate_packed


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """24 samples of mixed kinds and lengths in 6 shards (2 + 3 tokens per frame / tile)."""
    d = tmp_path_factory.mktemp("packmix")
    shards = []
    for i in range(6):
        shards.append([vid(f"v{i}a", [16, 40, 136][i % 3]), txt(f"t{i}"), img(f"i{i}"),
                       vid(f"v{i}b", [24, 136, 16][i % 3])])  # fmt: skip
    return make_set(d, "packmix", shards)


def _lengths(b):
    return [int(a) + int(v) for a, v in zip(b["num_text_tokens"], b["num_visual_tokens"])]


def _stream(pattern, tokenizer, rank=0, world=1, n=60, **kw):  # noqa: F811
    """The stream's samples in order (one per batch, unpacked): ``[(key, length)]``."""
    c = cfg(pattern, max_batch_size=1, batches_per_epoch=n, num_workers=0, **kw)
    return [(b["keys"][0], _lengths(b)[0]) for b in take(build_loader(c, tokenizer, rank=rank, world_size=world))]


def _next_fit(stream, budget, rows_per_batch):
    """The packing rule written out: rows of keys, a row closing when the next sample would overflow
    it; batches of ``rows_per_batch`` rows."""
    rows, row, used = [], [], 0
    for key, n in stream:
        if row and used + n > budget:
            rows.append(row)
            row, used = [], 0
        row.append(key)
        used += n
    return [rows[i : i + rows_per_batch] for i in range(0, len(rows) - rows_per_batch + 1, rows_per_batch)]


def _rows(b):
    out, at = [], 0
    for row in b["sample_lengths"].tolist():
        k = sum(1 for n in row if n)
        out.append(b["keys"][at : at + k])
        at += k
    return out


@pytest.mark.parametrize(("budget", "rows_per_batch"), [(120, 1), (200, 2)])
def test_rows_follow_next_fit_over_the_stream_order(mix, tokenizer, budget, rows_per_batch):  # noqa: F811
    stream = _stream(mix, tokenizer, shuffle_buffer=8, seed=3)
    c = cfg(mix, pack_tokens=budget, pack_rows=rows_per_batch, batches_per_epoch=6, num_workers=0,
            shuffle_buffer=8, seed=3, max_tokens_per_batch=10_000)  # fmt: skip
    batches = take(build_loader(c, tokenizer))
    assert len(batches) == 6
    expected = _next_fit(stream, budget, rows_per_batch)[:6]
    assert [_rows(b) for b in batches] == expected
    assert sum(len(r) for b in batches for r in _rows(b)) > 1.5 * len(batches) * rows_per_batch  # rows hold several
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for b in batches:
        assert list(b) == list(PACKED_BATCH_KEYS)
        lengths = b["sample_lengths"]
        assert lengths.shape[0] == rows_per_batch
        n = len(b["keys"])
        for key in ("video_frame_counts", "image_tile_counts", "num_visual_tokens", "num_text_tokens"):
            assert b[key].shape == (n,)
        assert b["image_grids"].shape == (n, 2)
        assert (b["attention_mask"].sum(1) == lengths.sum(1)).all()
        # each row's LLM tokens (text + visual, the placeholder replaced) stay within the budget
        at = 0
        for r, row in enumerate(lengths.tolist()):
            k = sum(1 for x in row if x)
            assert sum(_lengths(b)[at : at + k]) <= budget
            # each sample's ids hold its own placeholder (or none when it has no visual input)
            off = 0
            for j in range(k):
                ids = b["input_ids"][r, off : off + row[j]]
                visual = int(b["video_frame_counts"][at + j]) + int(b["image_tile_counts"][at + j]) > 0
                assert int((ids == image_id).sum()) == int(visual)
                off += row[j]
            at += k


def test_every_sample_of_an_epoch_appears_exactly_once(mix, tokenizer):  # noqa: F811
    # two ranks, one stream each: the first 12 samples of each rank's packed rows are its share of
    # the epoch; together they are the 24 samples, each once (shuffled)
    keys = []
    for rank in range(2):
        c = cfg(mix, pack_tokens=150, batches_per_epoch=12, num_workers=0, shuffle_buffer=6, seed=5)
        got = [k for b in take(build_loader(c, tokenizer, rank=rank, world_size=2)) for k in b["keys"]]
        assert len(got) >= 12
        keys += got[:12]
    everything = {f"{p}{i}{s}" for i in range(6) for p, s in (("v", "a"), ("t", ""), ("i", ""), ("v", "b"))}
    assert sorted(keys) == sorted(everything)


def _packed_fingerprint(b):
    return (*_fingerprint(b), tuple(b["sample_lengths"].flatten().tolist()))


def test_packed_resume_yields_the_same_rows(mix, tokenizer):  # noqa: F811
    def config():
        return cfg(mix, pack_tokens=160, pack_rows=2, batches_per_epoch=5, num_workers=2, shuffle_buffer=5)

    ref_loader = build_loader(config(), tokenizer)
    reference = [_packed_fingerprint(b) for _ in range(2) for b in ref_loader]  # two epochs
    assert len(reference) == 12
    for cut in (1, 4, 7):
        got, _ = resumed_run(config, tokenizer, _packed_fingerprint, len(reference), cut)
        assert got == reference, f"resumed after {cut} batches"


def test_samples_longer_than_a_row_are_skipped_and_counted(mix, tokenizer):  # noqa: F811
    # 136 frames -> 16 x 2 visual tokens + text > 40
    c = cfg(mix, pack_tokens=40, batches_per_epoch=3, num_workers=0)
    loader = build_loader(c, tokenizer)
    batches = take(loader)
    assert all(sum(_lengths(b)) <= 40 for b in batches)
    assert loader.skip_counts()["by_reason"].get("too_long", 0) >= 1
    with pytest.raises(ValueError, match="pack_tokens"):
        build_loader(cfg(mix, pack_tokens=0), tokenizer)


def test_collate_packed_lays_samples_end_to_end():
    def sample(key, ids, frames=0):
        ids = torch.tensor(ids)
        f = torch.zeros(frames, 8, 8, 3, dtype=torch.uint8) if frames else None
        return Sample(key, "s", ids, ids.clone(), frames=f, num_visual_tokens=frames, num_text_tokens=len(ids))

    a, b, c = sample("a", [1, 2, 3], 4), sample("b", [4, 5]), sample("c", [6, 7, 8, 9])
    batch = collate_packed([[a, b], [c]], pad_token_id=0, image_size=8)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, -100]]
    assert batch["sample_lengths"].tolist() == [[3, 2], [4, 0]]
    assert batch["video_frame_counts"].tolist() == [4, 0, 0] and batch["keys"] == ["a", "b", "c"]
    # the padded batch of the same samples: one sample per row
    padded = collate([a, b, c], pad_token_id=0, image_size=8)
    assert "sample_lengths" not in padded and padded["input_ids"].shape == (3, 4)


def test_pack_tokens_is_typed_validated_and_reaches_the_loader(mix):
    from videoflash.config import ConfigError, compose, validate
    from videoflash.train.data import loader_config

    base = ["experiment=quickstart", "stage=2"]
    c = validate(compose([*base, "data.pack_tokens=0"]))
    assert c.data.pack_tokens == 0  # 0 = off
    for override, key in (("data.pack_tokens=16", "data.pack_tokens"),  # below stage.max_tokens
                          ("data.pack_tokens=-1", "data.pack_tokens"),
                          ("data.pack_tokens=40000", "data.pack_tokens")):  # with max_batch_tokens  # fmt: skip
        extra = ["data.max_batch_tokens=8000"] if override.endswith("40000") else []
        with pytest.raises(ConfigError) as err:
            validate(compose([*base, override, *extra], check=False))
        assert err.value.key == key, override
    with pytest.raises(ConfigError) as err:  # epochs give no step count when rows hold several samples
        validate(compose(["stage=2", "data.pack_tokens=40000"], check=False))
    assert err.value.key == "stage.max_steps"
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="data.pack_tokens"):  # typed: Hydra refuses it
        compose([*base, "data.pack_tokens=lots"], check=False)

    class ModelConfig:
        frames_per_clip, tokens_per_frame, tokens_per_image, max_grid = 4, 4, 16, 2

    def typed(*overrides):
        raw = compose([*base, "data.num_samples=64", *overrides])
        raw.data.sources[0].shards = mix
        return validate(raw)

    lcfg, _ = loader_config(typed("data.pack_tokens=40000", "stage.micro_batch_size=2"), ModelConfig(), world_size=2)
    # rows of 40000 tokens, 2 per micro-batch; 64 samples over 2 ranks x 2 rows: at most 16 batches a rank
    assert (lcfg.pack_tokens, lcfg.pack_rows, lcfg.batches_per_epoch) == (40000, 2, 16)
    lcfg, _ = loader_config(typed(), ModelConfig(), world_size=2)
    assert lcfg.pack_tokens is None
