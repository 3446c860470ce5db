"""The raw-sample stream at scale on real tar shards of text samples (video is not the point here):
every sample of an epoch exactly once over ranks x workers, no read amplification, resume that reads
nothing twice, a change of world size or worker count that keeps exactly-once, shorter epochs; and
the re-planning rule checked by brute force over random positions."""

import json
import random
import tarfile

import pytest

from tests.data_fixtures import tar_record_bytes, tokenizer  # noqa: F401
from tests.test_pipeline import cfg, make_set, take, txt
from videoflash.data import build_loader
from videoflash.data.pipeline import OlderLoaderState, _Stream
from videoflash.data.units import Plan, UnitTable, replan, window_samples
from videoflash.train.checkpoint import check_plain

# 16 streams on 2 cores are more workers than torch suggests; they are what is being tested
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def text_set(tmp_path, prefix, shards, per_shard, offsets=True):
    return make_set(tmp_path, prefix, [[txt(f"{prefix}{i}_{k}") for k in range(per_shard)] for i in range(shards)],
                    offsets=offsets)  # fmt: skip


def all_keys(prefix, shards, per_shard):
    return sorted(f"{prefix}{i}_{k}" for i in range(shards) for k in range(per_shard))


def record_bytes(pattern, shards):
    out = {}
    for i in range(shards):
        out.update(tar_record_bytes(pattern.split("{")[0] + f"{i:06d}.tar"))
    return out


def tcfg(pattern, **kw):
    base = dict(max_batch_size=1, max_tokens_per_batch=10_000, unit_samples=4, shuffle_buffer=8)
    base.update(kw)
    return cfg(pattern, **base)


def run_ranks(c, world, tok):
    """Every rank's loader of one epoch: ``[(keys, loader)]``."""
    out = []
    for rank in range(world):
        loader = build_loader(c, tok, rank=rank, world_size=world)
        out.append(([k for b in take(loader) for k in b["keys"]], loader))
    return out


# -- (a) exactly once, (b) no read amplification ------------------------------------------------------


@pytest.mark.parametrize("shards,per_shard,world,workers", [(8, 16, 4, 4), (32, 2, 2, 2)])
def test_one_epoch_reads_every_sample_once_and_only_its_bytes(tmp_path, tokenizer, shards, per_shard, world, workers):
    # 16 streams over 8 shards (fewer shards than streams), and 4 streams over 32 shards
    pattern = text_set(tmp_path, "s", shards, per_shard)
    samples = shards * per_shard
    c = tcfg(pattern, num_workers=workers, batches_per_epoch=samples // world)
    runs = run_ranks(c, world, tokenizer)
    keys = [k for ks, _ in runs for k in ks]
    assert sorted(keys) == all_keys("s", shards, per_shard)  # brute force: each once, none missing
    sizes = record_bytes(pattern, shards)
    for ks, loader in runs:
        used = sum(sizes[k] for k in ks)
        stats = loader.read_stats()
        assert stats["bytes_used"] == used
        assert stats["bytes_read"] <= 1.1 * used, stats


def test_256_streams_over_64_shards_read_only_their_samples(tmp_path, tokenizer):
    # no DataLoader: each of the 256 streams is built and run directly, as its own rank would
    pattern = text_set(tmp_path, "w", 64, 8)
    c = tcfg(pattern, num_workers=0, unit_samples=2, shuffle_buffer=2, batches_per_epoch=2)
    loader = build_loader(c, tokenizer, rank=0, world_size=256)
    plan = Plan(256, 0)
    sizes = record_bytes(pattern, 64)
    seen = []
    for g in range(256):
        stream = _Stream(c, loader.sources, loader.table, plan, tokenizer, 0, g, 0, {}, 2)
        keys = [k for b in stream for k in b["keys"]]
        used = sum(sizes[k] for k in keys)
        assert stream.bytes_read <= 1.1 * used, (g, stream.bytes_read, used)
        seen += keys
    assert sorted(seen) == all_keys("w", 64, 8)


def test_old_shard_sets_without_offsets_still_load(tmp_path, tokenizer, caplog):
    pattern = text_set(tmp_path, "o", 4, 8, offsets=False)
    c = tcfg(pattern, num_workers=0, batches_per_epoch=32)
    with caplog.at_level("INFO", logger="videoflash.data"):
        keys = [k for b in take(build_loader(c, tokenizer)) for k in b["keys"]]
    assert sorted(keys) == all_keys("o", 4, 8)
    assert any("without an offsets file" in r.getMessage() for r in caplog.records)


def test_a_damaged_sample_costs_only_itself(tmp_path, tokenizer):
    pattern = text_set(tmp_path, "d", 1, 8)
    path = tmp_path / "d-000000.tar"
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        offset = tf.getmembers()[3].offset
    data[offset : offset + 512] = b"\x07" * 512  # the header of sample d0_3
    path.write_bytes(bytes(data))
    loader = build_loader(tcfg(pattern, num_workers=0, batches_per_epoch=7), tokenizer)
    keys = [k for b in take(loader) for k in b["keys"]]
    assert sorted(keys) == sorted(set(all_keys("d", 1, 8)) - {"d0_3"})
    assert loader.skip_counts()["by_reason"] == {"tar_error": 1}


# -- (c) resume: the same batches, at a cost that does not grow with the position ----------------


def test_resume_is_exact_and_reads_the_same_at_10_and_90_percent(tmp_path, tokenizer):
    pattern = text_set(tmp_path, "r", 8, 20)
    config = lambda: tcfg(pattern, num_workers=2, batches_per_epoch=160)  # noqa: E731
    reference = [tuple(b["keys"]) for b in take(build_loader(config(), tokenizer))]
    assert sorted(k for ks in reference for k in ks) == all_keys("r", 8, 20)
    first_reads = {}
    for cut in (16, 144):  # 10 % and 90 % of the epoch
        a = build_loader(config(), tokenizer)
        got = [tuple(b["keys"]) for b in take(a, cut)]
        state = json.loads(json.dumps(a.state_dict()))
        b = build_loader(config(), tokenizer)
        b.load_state_dict(state)
        it = iter(b)
        got.append(tuple(next(it)["keys"]))
        first_reads[cut] = b.read_stats()["bytes_read"]
        got += [tuple(x["keys"]) for x in it]
        assert got == reference, f"resumed after {cut} batches"
    window_bytes = 8 * 1024  # one shuffle window: 8 samples of one 512-byte header and one block
    assert 0 < first_reads[144] <= first_reads[16] + window_bytes, first_reads


# -- (d) another world size or worker count: every sample still once -------------------------------


@pytest.mark.parametrize("old,new,cut", [((2, 2), (1, 3), 5), ((4, 0), (2, 0), 3), ((1, 2), (3, 0), 10), ((2, 2), (2, 1), 6)])
def test_resume_with_another_layout_keeps_every_sample_once(tmp_path, tokenizer, old, new, cut):
    # 64 samples in 16 units of 4, shuffled within each unit; a cut inside the streams' first units
    # leaves partly read units; the cuts are chosen so that the rest splits evenly over the new streams
    # (every stream yields the same number of batches, so only then can one epoch be exactly the data)
    pattern = text_set(tmp_path, "x", 8, 8)
    (w0, k0), (w1, k1) = old, new
    before, states = [], []
    for rank in range(w0):
        loader = build_loader(tcfg(pattern, num_workers=k0, shuffle_buffer=4, batches_per_epoch=64 // w0), tokenizer, rank, w0)
        before += [k for b in take(loader, cut) for k in b["keys"]]
        states.append(json.loads(json.dumps(loader.state_dict())))
    after = []
    for rank in range(w1):
        loader = build_loader(tcfg(pattern, num_workers=k1, shuffle_buffer=4, batches_per_epoch=64 // w1), tokenizer, rank, w1)
        assert not loader.same_layout(states[0])
        with pytest.raises(OlderLoaderState, match="older loader"):
            loader.load_state_dict([dict(st, version=1) for st in states])
        with pytest.raises(ValueError, match="every rank's state"):
            loader.load_state_dict(states[0])
        loader.load_state_dict(list(reversed(states)))
        after += [k for b in take(loader) for k in b["keys"]]
        assert loader.epoch == 0
        check_plain(loader.state_dict())  # what a checkpoint's rank file may hold (weights_only=True)
    assert len(before) == w0 * cut
    assert sorted(before + after) == all_keys("x", 8, 8)


# -- (e) an epoch shorter than the data walks through it ------------------------------------------


def test_samples_per_epoch_shorter_than_the_data(tmp_path, tokenizer):
    pattern = text_set(tmp_path, "e", 8, 8)
    loader = build_loader(tcfg(pattern, num_workers=2, samples_per_epoch=16, batches_per_epoch=16), tokenizer)
    epochs = [[k for b in loader for k in b["keys"]] for _ in range(4)]
    assert [len(set(e)) for e in epochs] == [16] * 4
    assert sorted(k for e in epochs for k in e) == all_keys("e", 8, 8)  # 4 epochs of 16: the data once
    assert loader.epoch == 3


# -- the rules of videoflash.data.units, by brute force ---------------------------------------------


def test_epoch_quotas_by_hand():
    # sources of 16 and 14 samples in units of 3: 6 and 5 units; weights 1 and 2: mix 16 + 28 = 44
    t = UnitTable([[5, 8, 3], [7, 7]], [1.0, 2.0], 3, None, seed=0)
    assert [len(u) for u in t.units] == [6, 6] and t.samples_per_epoch == 44
    assert t.quota == [6, 12]  # round(44 * 1 * 6 / 44), round(44 * 2 * 6 / 44)
    half = UnitTable([[5, 8, 3], [7, 7]], [1.0, 2.0], 3, 22, seed=0)
    assert half.quota == [3, 6]
    # an epoch holds exactly its quota of each source, and consecutive epochs walk a source's passes
    seen = [[t.unit(e * 18 + j) for j in range(18)] for e in range(2)]
    assert [sum(u[0] == 1 for u in ep) for ep in seen] == [12, 12]
    assert sorted(u[1:] for u in seen[0] if u[0] == 0) == sorted(tuple(r) for r in t.units[0].tolist())


def test_replan_keeps_every_sample_of_the_epoch_once_by_brute_force():
    table = UnitTable([[5, 8, 3], [7, 7]], [1.0, 2.0], 3, None, seed=3)
    N, e = table.epoch_units, 2
    end = (e + 1) * N
    everything = sorted((t, m) for t in range(e * N, end) for m in range(table.unit(t)[3]))

    def consume(plan, wu, shuffle, rng):
        got, positions = [], {}
        for s in range(plan.streams):
            w = rng.randrange(3)
            for ww in range(w):
                got += window_samples(table, plan, s, ww, wu, shuffle)
            here = window_samples(table, plan, s, w, wu, shuffle)
            off = min(rng.randrange(6), len(here))
            got += here[:off]
            positions[s] = (w, off)
        return got, positions

    def rest_of_epoch(plan):
        out = []
        for s in range(plan.streams):
            k = 0
            while k < len(plan.head[s]) or plan.item(s, k)[0] < end:
                t, members = plan.item(s, k)
                out += [(t, m) for m in (range(table.unit(t)[3]) if members is None else members)]
                k += 1
        return out

    for trial in range(200):
        rng = random.Random(trial)
        wu, shuffle = rng.randrange(1, 3), rng.random() < 0.7
        plan, seen = Plan(4, e * N), []
        for streams in (3, 5, 1, 2):  # four changes of layout in one epoch
            got, positions = consume(plan, wu, shuffle, rng)
            seen += got
            plan = replan(table, plan, positions, streams, wu, shuffle)
            sizes = [sum(table.unit(t)[3] if m is None else len(m) for t, m in h) for h in plan.head]
            assert max(sizes) - min(sizes) <= 1  # the ragged rest is split evenly
        assert sorted(x for x in seen + rest_of_epoch(plan) if x[0] < end) == everything, trial
