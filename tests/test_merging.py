"""Token merging against the published schedules, a brute-force Python version and a hand-worked case."""

from __future__ import annotations

import math

import pytest
import torch

from videoflash.model.merging import merge_schedule, merge_tokens


# --------------------------------------------------------------------------------------------------
# Schedules (the published numbers, videochat_flash.md section 1.3)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p,target,want",
    [
        (784, 64, [392, 196, 98, 34]),  # video clip, UMT 224
        (3136, 64, [1568, 784, 392, 196, 98, 34]),  # video clip, UMT 448
        (196, 64, [98, 34]),  # image tile, UMT 224
        (1024, 64, [512, 256, 128, 64]),  # video clip, InternVideo2 224
        (64, 64, []),
        (10, 64, []),
        (7, 1, [3, 2, 1]),  # 7 -> 4 -> 2 -> 1 (halving rounds down)
    ],
)
def test_published_schedules(p, target, want):
    assert merge_schedule(p, target) == want
    assert p - sum(want) == min(p, target)


# --------------------------------------------------------------------------------------------------
# Brute force: plain lists, loops over tokens, one step at a time
# --------------------------------------------------------------------------------------------------


def brute_step(tokens: list[list[float]], sizes: list[float], r: int, heads: int):
    c = len(tokens[0])
    d = c // heads
    metric = []
    for tok in tokens:
        m = [sum(tok[h * d + k] for h in range(heads)) / heads for k in range(d)]
        norm = math.sqrt(sum(v * v for v in m))
        metric.append([v / norm for v in m])
    a_ids = list(range(0, len(tokens), 2))
    b_ids = list(range(1, len(tokens), 2))
    best = {}  # A index -> (score, B index)
    gaps = []
    for i in a_ids:
        scored = sorted(((sum(x * y for x, y in zip(metric[i], metric[j])), j) for j in b_ids), reverse=True)
        best[i] = scored[0]
        if len(scored) > 1:
            gaps.append(scored[0][0] - scored[1][0])
    ranked = sorted(a_ids, key=lambda i: -best[i][0])
    scores_sorted = [best[i][0] for i in ranked]
    gaps += [s - t for s, t in zip(scores_sorted, scores_sorted[1:])]
    assert min(gaps, default=1.0) > 1e-9, "random input has (near) ties: the order would be ambiguous"

    merged_into = {j: [] for j in b_ids}
    for i in ranked[:r]:
        merged_into[best[i][1]].append(i)
    out_tokens, out_sizes = [], []
    for i in ranked[r:]:
        out_tokens.append(list(tokens[i]))
        out_sizes.append(sizes[i])
    for j in b_ids:
        members = [j] + merged_into[j]
        total = sum(sizes[m] for m in members)
        out_tokens.append([sum(tokens[m][k] * sizes[m] for m in members) / total for k in range(c)])
        out_sizes.append(total)
    return out_tokens, out_sizes


def brute_merge(tokens: list[list[float]], target: int, heads: int) -> list[list[float]]:
    sizes = [1.0] * len(tokens)
    while len(tokens) > target:
        p = len(tokens)
        r = p - target if p - target <= p // 2 else p // 2
        tokens, sizes = brute_step(tokens, sizes, r, heads)
    return tokens


@pytest.mark.parametrize(
    "batch,p,target,c,heads",
    [
        (2, 784, 64, 64, 16),  # the 224 video clip schedule, 16 heads like UMT-L
        (3, 196, 64, 16, 4),
        (2, 13, 3, 8, 2),  # odd counts at every step
        (2, 11, 4, 6, 3),
        (1, 9, 8, 4, 1),  # a single step removing one token
        (2, 7, 1, 4, 2),
    ],
)
def test_matches_brute_force(batch, p, target, c, heads):
    x = torch.randn(batch, p, c, generator=torch.Generator().manual_seed(p * 31 + c), dtype=torch.float64)
    got = merge_tokens(x, target, heads)
    assert got.shape == (batch, target, c)
    for b in range(batch):
        want = torch.tensor(brute_merge(x[b].tolist(), target, heads), dtype=torch.float64)
        torch.testing.assert_close(got[b], want, atol=1e-10, rtol=1e-10)


def test_float32_close_to_brute_force():
    x = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(5))
    got = merge_tokens(x, 10, 2)
    for b in range(2):
        want = torch.tensor(brute_merge(x[b].double().tolist(), 10, 2))
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# A hand-worked case
# --------------------------------------------------------------------------------------------------


def hand_tokens():
    # Six 2-d tokens, num_heads=1 (the metric is the normalised token itself).
    # A = even indices t0, t2, t4; B = odd indices t1, t3, t5.
    #   t1 = (1, 0)   points along +x        t3 = (0, 1)  along +y      t5 = (-1, 0) along -x
    #   t0 = (2, .1), t2 = (3, -.1): nearly +x -> best B is t1 (cos ~ .999)
    #   t4 = (-2, .3): nearly -x             -> best B is t5 (cos ~ .989)
    # Schedule 6 -> 2: r = 3 (6-2 = 4 > 3), then r = 1 (3-2 = 1 <= 1).
    # Step 1 merges all of A: B becomes
    #   m1 = (t0+t1+t2)/3 = (2, 0) size 3;  t3 = (0, 1) size 1;  m5 = (t4+t5)/2 = (-1.5, .15) size 2.
    # Step 2: tokens [m1, t3, m5]; A = {m1, m5}, B = {t3}. cos(m1, t3) = 0 < cos(m5, t3) ~ .0995,
    # so m5 merges into t3 with sizes 2 and 1: (1*(0, 1) + 2*(-1.5, .15)) / 3 = (-1, 1.3/3),
    # the plain mean of the original t3, t4, t5 (an unweighted mean would give (-.75, .575)).
    # Output order: unmerged A first (m1), then B: [(2, 0), (-1, 1.3/3)].
    return torch.tensor([[2.0, 0.1], [1.0, 0.0], [3.0, -0.1], [0.0, 1.0], [-2.0, 0.3], [-1.0, 0.0]])


def test_hand_worked_example():
    x = hand_tokens()[None]
    out = merge_tokens(x, 2, num_heads=1)
    torch.testing.assert_close(out[0], torch.tensor([[2.0, 0.0], [-1.0, 1.3 / 3]]))


def test_hand_worked_order_one_step():
    # t0 = (1, 0), t1 = (0, 1), t2 = (0, 3), t3 = (1, 1); A = {t0, t2}, B = {t1, t3}.
    # t0: cos with t1 = 0, with t3 = .707 -> best t3 (.707).  t2: cos with t1 = 1 -> best t1 (1.0).
    # Sorted A: [t2, t0]; r = 1 merges t2 into t1 -> (0, 2). Output [t0, (t1+t2)/2, t3].
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 1.0]]])
    torch.testing.assert_close(merge_tokens(x, 3, 1)[0], torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))


def test_head_averaging_decides_the_match():
    # num_heads=2: a token's metric is the mean of its two 2-channel chunks, normalised.
    # Tokens in the order [a, b1, x, b2]: A = even positions {a, x}, B = odd positions {b1, b2}.
    #   a  = (1, 0 | 1, 0)      -> metric (1, 0)
    #   b1 = (1, 0 | -.5, 0)    -> mean (.25, 0)  -> metric (1, 0):       cos(a, b1) = 1
    #   b2 = (0, 1 | 1, .2)     -> mean (.5, .6)  -> metric (.64, .77):   cos(a, b2) = .64
    #   x  = (-1, -1 | -1, -1)  -> metric (-.71, -.71): best is b1 with cos -.71
    # The cosine of the full 4-d vectors would pick b2 for a (.49 against .32); the mean picks b1.
    # r = 1 (4 -> 3): a has the best score and merges into b1 -> (1, 0, .25, 0).
    # Output [x (unmerged A), (a + b1)/2, b2].
    a, b1, x, b2 = [1.0, 0.0, 1.0, 0.0], [1.0, 0.0, -0.5, 0.0], [-1.0] * 4, [0.0, 1.0, 1.0, 0.2]
    out = merge_tokens(torch.tensor([[a, b1, x, b2]]), 3, num_heads=2)
    torch.testing.assert_close(out[0], torch.tensor([x, [1.0, 0.0, 0.25, 0.0], b2]))


# --------------------------------------------------------------------------------------------------
# Gradients, batching, edge cases
# --------------------------------------------------------------------------------------------------


def test_gradients_reach_every_token():
    # Every input token ends up in exactly one output token whose value is the mean over its
    # members, so d(sum of outputs)/d(input token) = 1 / (members of its output) > 0 in every
    # channel, and the gradients of each channel sum to the number of output tokens.
    x = torch.randn(2, 784, 32, generator=torch.Generator().manual_seed(7), requires_grad=True)
    merge_tokens(x, 64, 16).sum().backward()
    assert (x.grad > 0).all()
    torch.testing.assert_close(x.grad.sum(dim=1), torch.full((2, 32), 64.0))


def test_merged_token_gets_gradient_from_merged_output():
    # In the hand-worked case, output 1 is the mean of t3, t4, t5: each gets 1/3, the rest nothing.
    x = hand_tokens()[None].requires_grad_()
    merge_tokens(x, 2, 1)[0, 1].sum().backward()
    want = torch.tensor([0, 0, 0, 1 / 3, 1 / 3, 1 / 3])[:, None].expand(6, 2)
    torch.testing.assert_close(x.grad[0], want)


def test_batch_is_independent():
    x = torch.randn(4, 101, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    together = merge_tokens(x, 20, 4)
    alone = torch.cat([merge_tokens(x[i : i + 1], 20, 4) for i in range(4)])
    torch.testing.assert_close(together, alone)


def test_no_merge_and_errors():
    x = torch.randn(1, 5, 4)
    assert merge_tokens(x, 5, 2) is x
    assert merge_tokens(x, 9, 2) is x
    with pytest.raises(ValueError):
        merge_tokens(x, 0, 2)
    with pytest.raises(ValueError):
        merge_tokens(x, 2, 3)  # 4 channels do not split into 3 heads
    with pytest.raises(ValueError):
        merge_tokens(x[0], 2, 2)


def test_bf16_runs():
    x = torch.randn(2, 196, 32, dtype=torch.bfloat16)
    out = merge_tokens(x, 64, 16)
    assert out.shape == (2, 64, 32) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
