"""The order in which the loader's streams read raw samples: units, epochs, plans, windows.

Everything here is a pure function of the seed, the sources' shard sizes (from the compact index)
and small integers; nothing reads a shard. :mod:`.pipeline` reads the samples this module names.

Terms, from the bottom up:

- **Unit**: up to ``unit_samples`` consecutive samples of one shard, ``(source, shard, first, count)``.
  A source's units are its shards cut in order; a shard smaller than ``unit_samples`` is one unit.
- **Source run**: a source is an endless run of passes, pass ``q`` being a permutation of its units
  seeded by ``(seed, source, q)``.
- **Epoch**: epoch ``e`` takes the next ``quota_i`` units of each source's run (``e * quota_i`` up
  to ``(e + 1) * quota_i``), where ``quota_i`` is source ``i``'s share of ``samples_per_epoch``
  (``weight_i * num_samples_i`` of ``sum_j weight_j * num_samples_j``, in units), and deals them in
  an order drawn by ``(seed, "mix", e)``: a random permutation of the epoch's slots, whose first
  ``quota_0`` go to source 0, the next ``quota_1`` to source 1, and so on. With weights 1 and the
  default ``samples_per_epoch`` an epoch is every unit of every source once; a smaller
  ``samples_per_epoch`` walks through the data over several epochs. The epochs, one after another,
  form the **global sequence**; its unit ``t`` is slot ``t mod N`` of epoch ``t // N`` (``N`` units
  per epoch), so a unit id is an integer, identical in every process.
- **Plan**: how the units of an epoch are dealt to ``S`` streams: stream ``s`` first takes its
  ``head[s]`` items (explicit ``(t, members)``; empty in a fresh epoch), then units
  ``t = base + s, base + s + S, ...`` (``base = e * N`` in a fresh epoch). A stream that has taken
  the epoch's last unit reads on into the next epoch's units (the loader's batch count, not the
  data, ends an epoch).
- **Window**: ``window_units`` consecutive items of a stream's list; its samples are shuffled by a
  permutation seeded by the window's items. A stream's position is ``(window, offset)``: the
  ``offset`` first samples of window ``window`` and everything before are consumed. Restoring a
  position costs one permutation of one window and reads nothing.
- **Re-plan** (:func:`replan`): given a plan and the positions of all its streams, every item before
  a stream's window is done and its window is done up to its offset. The rest of the epoch is the
  ragged set between the lowest and the highest frontier (partly consumed units with the members
  left, and untouched units below the highest frontier) followed by untouched units. The new plan
  splits the ragged set's samples evenly (to one sample) into the new streams' heads and continues
  with ``base`` = the highest frontier and the new stride. Every sample of the epoch is then read
  exactly once over the whole run, whatever the old and new stream counts; the cost is the size of
  the ragged set, not the position in the epoch.

Costs: the unit table is 12 bytes per unit; an epoch's deal is computed once per process and epoch
(for 10^8 samples in units of 8: 1.25e7 units, about 150 MB and a few seconds); a window is a list
of its samples.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np

__all__ = ["UnitTable", "Plan", "window_samples", "replan", "stable_seed"]


def stable_seed(*parts) -> int:
    """A 64-bit seed from any parts, identical in every process (unlike ``hash``)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def _rng(*parts) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(stable_seed(*parts)))


class UnitTable:
    """The units of every source and the global sequence over them (see the module doc).

    ``shard_sizes``: per source, the samples of each of its shards; ``weights``: per source;
    ``num_samples``: per source, its size for the mix share (default: the sum of its shard sizes).
    """

    _CACHE = 4  # epochs and source passes kept computed (a stream needs one or two at a time)

    def __init__(self, shard_sizes: list[list[int]], weights: list[float], unit_samples: int,
                 samples_per_epoch: int | None, seed: int, num_samples: list[int] | None = None):  # fmt: skip
        if unit_samples < 1:
            raise ValueError(f"unit_samples must be >= 1, got {unit_samples}")
        self.seed = int(seed)
        self.units: list[np.ndarray] = []  # per source: int32 [M_i, 3] rows of (shard, first, count)
        for sizes in shard_sizes:
            n = np.asarray(sizes, dtype=np.int64).reshape(-1)
            per_shard = -(-n // unit_samples)  # units of each shard
            shard = np.repeat(np.arange(len(n)), per_shard)
            ends = np.cumsum(per_shard)
            first = (np.arange(int(ends[-1]) if len(n) else 0) - np.repeat(ends - per_shard, per_shard)) * unit_samples
            count = np.minimum(unit_samples, n[shard] - first)
            self.units.append(np.stack([shard, first, count], axis=1).astype(np.int32))
        sizes = num_samples if num_samples is not None else [sum(int(n) for n in s) for s in shard_sizes]
        mix = sum(float(w) * n for w, n in zip(weights, sizes))
        if mix <= 0:
            raise ValueError("every source has zero weight or zero samples")
        self.samples_per_epoch = int(samples_per_epoch) if samples_per_epoch else max(1, round(mix))
        self.quota = [
            max(1, round(self.samples_per_epoch * float(w) * len(u) / mix)) if w > 0 and len(u) else 0
            for w, u in zip(weights, self.units)
        ]
        self.epoch_units = sum(self.quota)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._passes: dict[tuple[int, int], np.ndarray] = {}

    def _pass(self, i: int, q: int) -> np.ndarray:
        key = (i, q)
        if key not in self._passes:
            if len(self._passes) >= self._CACHE * max(1, len(self.units)):
                self._passes.clear()
            self._passes[key] = _rng(self.seed, "units", i, q).permutation(len(self.units[i]))
        return self._passes[key]

    def _run(self, i: int, start: int, count: int) -> np.ndarray:
        """Rows of source ``i``'s units at positions ``start .. start + count - 1`` of its run."""
        m = len(self.units[i])
        out, pos = [], start
        while pos < start + count:
            q, r = divmod(pos, m)
            take = min(m - r, start + count - pos)
            out.append(self._pass(i, q)[r : r + take])
            pos += take
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, unit row) of every slot of epoch ``e``."""
        if e not in self._epochs:
            if len(self._epochs) >= self._CACHE:
                self._epochs.pop(next(iter(self._epochs)))
            slots = _rng(self.seed, "mix", e).permutation(self.epoch_units)  # source 0 gets the first quota_0 ...
            src = np.empty(self.epoch_units, np.int32)
            row = np.empty(self.epoch_units, np.int32)
            start = 0
            for i, k in enumerate(self.quota):
                src[slots[start : start + k]] = i
                row[slots[start : start + k]] = self._run(i, e * k, k)
                start += k
            self._epochs[e] = (src, row)
        return self._epochs[e]

    def unit(self, t: int) -> tuple[int, int, int, int]:
        """Unit ``t`` of the global sequence: ``(source, shard, first sample, count)``."""
        e, j = divmod(int(t), self.epoch_units)
        src, row = self._epoch(e)
        i = int(src[j])
        shard, first, count = (int(x) for x in self.units[i][row[j]])
        return i, shard, first, count


@dataclass
class Plan:
    """The units of one epoch dealt to ``streams`` streams (see the module doc)."""

    streams: int
    base: int
    head: list = field(default_factory=list)  # per stream: [[t, members or None (the whole unit)], ...]

    def __post_init__(self):
        if not self.head:
            self.head = [[] for _ in range(self.streams)]
        if len(self.head) != self.streams:
            raise ValueError(f"a plan of {self.streams} streams has {len(self.head)} heads")

    def item(self, s: int, k: int) -> tuple[int, list | None]:
        """Item ``k`` of stream ``s``: ``(unit id, members or None for all of them)``."""
        head = self.head[s]
        if k < len(head):
            t, members = head[k]
            return int(t), members
        return self.base + s + (k - len(head)) * self.streams, None

    def to_json(self) -> dict:
        return {"streams": self.streams, "base": self.base, "head": self.head}

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        return cls(int(d["streams"]), int(d["base"]), [[[int(t), m] for t, m in h] for h in d["head"]])


def window_samples(table: UnitTable, plan: Plan, s: int, w: int, window_units: int, shuffle: bool):
    """The samples ``(t, member)`` of window ``w`` of stream ``s``, in reading order."""
    items = [plan.item(s, k) for k in range(w * window_units, (w + 1) * window_units)]
    out = []
    for t, members in items:
        out.extend((t, m) for m in (range(table.unit(t)[3]) if members is None else members))
    if shuffle:
        random.Random(stable_seed(table.seed, "window", items)).shuffle(out)
    return out


def replan(table: UnitTable, plan: Plan, positions: dict, streams: int, window_units: int, shuffle: bool) -> Plan:
    """The rest of ``plan``'s epoch for ``streams`` streams, after its streams reached ``positions``
    (``{stream: (window, offset)}``, missing streams at ``(0, 0)``); see the module doc."""
    S = plan.streams
    consumed: dict[int, set] = {}
    done = []  # per old stream: its items before this index are done
    frontier = plan.base  # every unit id >= frontier in the regular part is untouched
    for s in range(S):
        w, off = (int(x) for x in positions.get(s, (0, 0)))
        for t, m in window_samples(table, plan, s, w, window_units, shuffle)[:off]:
            consumed.setdefault(t, set()).add(m)
        done.append(w * window_units)
        regular = (w + 1) * window_units - len(plan.head[s])  # regular items up to the end of its window
        if regular > 0:
            frontier = max(frontier, plan.base + s + (regular - 1) * S + 1)

    left: list[tuple[int, int]] = []  # every sample not consumed below the frontier, in plan order
    whole: set = set()  # units none of whose members is consumed (kept as None in the new plan)

    def keep(t: int, members) -> None:
        ms = range(table.unit(t)[3]) if members is None else members
        got = consumed.get(t, ())
        rest = [m for m in ms if m not in got]
        if members is None and len(rest) == len(ms):
            whole.add(t)
        left.extend((t, m) for m in rest)

    for s in range(S):
        for k in range(done[s], len(plan.head[s])):
            keep(*plan.item(s, k))
    # the regular part between the lowest and the highest frontier (units below it are done)
    low = min(plan.base + s + max(0, done[s] - len(plan.head[s])) * S for s in range(S))
    for t in range(max(plan.base, low), frontier):
        s, r = (t - plan.base) % S, (t - plan.base) // S
        if len(plan.head[s]) + r >= done[s]:
            keep(t, None)

    heads = []
    for n in range(streams):
        part = left[len(left) * n // streams : len(left) * (n + 1) // streams]
        items: list = []
        for t, m in part:
            if items and items[-1][0] == t:
                items[-1][1].append(m)
            else:
                items.append([t, [m]])
        for it in items:  # a whole untouched unit stays one compact item
            if it[0] in whole and len(it[1]) == table.unit(it[0])[3]:
                it[1] = None
        heads.append(items)
    return Plan(streams, frontier, heads)
