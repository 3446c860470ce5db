"""Frame-index policies against hand-worked examples of the published rule (videochat_flash.md 3.2).

Every expected list below was worked out by hand from the rule:

    n = 4 * floor(duration / 4); n = 4 if n == 0; n = min(n, max); low = 4 * floor(vlen / 4) if low > vlen;
    n = max(n, low); bounds = int(linspace(0, vlen, min(n, vlen) + 1)); idx = (a + b - 1) // 2; pad with last.
"""

import math

import pytest

from videoflash.data.sampling import frame_count, frame_indices, middle_indices, parse_policy, span_to_frames


# -- middle sampling ------------------------------------------------------------------------------


def test_middle_indices_hand_worked():
    # linspace(0, 10, 5) = [0, 2.5, 5, 7.5, 10] -> [0, 2, 5, 7, 10]; intervals (0,1) (2,4) (5,6) (7,9)
    assert middle_indices(10, 4) == [0, 3, 5, 8]
    # linspace(0, 1000, 5) = [0, 250, 500, 750, 1000]; midpoints (0+249)//2 ...
    assert middle_indices(1000, 4) == [124, 374, 624, 874]
    # one frame per interval when n == vlen
    assert middle_indices(8, 8) == list(range(8))


def test_middle_indices_pads_with_last_frame():
    # 3 frames, 8 wanted: each frame once, then the last repeated
    assert middle_indices(3, 8) == [0, 1, 2, 2, 2, 2, 2, 2]
    assert middle_indices(1, 4) == [0, 0, 0, 0]


def test_middle_indices_64_of_100_integer_arithmetic():
    # bounds[i] = floor(100 * i / 64) (1.5625 i: exact in binary, so int(linspace) equals the integer floor)
    bounds = [100 * i // 64 for i in range(65)]
    expected = [(bounds[i] + bounds[i + 1] - 1) // 2 for i in range(64)]
    got = middle_indices(100, 64)
    assert got == expected
    assert got[:4] == [0, 1, 3, 4] and got[-1] == 98  # by hand: bounds 0 1 3 4 6 ... 98 100 -> (0,0) (1,2) (3,3) (4,5) ... (98,99)


# -- dynamic_fps1 counts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vlen, fps, lo, hi, expected",
    [
        # stage 3/4: [64, 512]
        (300, 30.0, 64, 512, 64),  # 10 s -> 8 -> oversampled to the 64 lower bound
        (6000, 30.0, 64, 512, 200),  # 200 s -> about 1 fps
        (6045, 30.0, 64, 512, 200),  # 201.5 s -> floor to a multiple of 4
        (30000, 30.0, 64, 512, 512),  # 1000 s -> capped
        (40, 30.0, 64, 512, 40),  # 40 frames < 64: the lower bound becomes 4*floor(40/4) = 40
        (42, 30.0, 64, 512, 40),  # 42 frames: lower bound 40
        (2, 30.0, 64, 512, 4),  # n = 0 -> 4; lower bound 0
        # stage 2: [1, 8]
        (150, 30.0, 1, 8, 4),  # 5 s -> 4
        (1800, 30.0, 1, 8, 8),  # 60 s -> 60 -> capped at 8
        (90, 30.0, 1, 8, 4),  # 3 s -> 0 -> 4
        # a 1 fps frame folder of 130 frames: 130 s -> 128
        (130, 1.0, 64, 512, 128),
    ],
)
def test_dynamic_fps1_counts(vlen, fps, lo, hi, expected):
    assert frame_count(vlen, fps, "dynamic_fps1", lo, hi) == expected
    assert len(frame_indices(vlen, fps, "dynamic_fps1", lo, hi)) == expected


def test_dynamic_fps1_indices_short_video_oversampled():
    # 40 frames at 30 fps in stage 3 -> n = 40 = vlen: every frame once
    assert frame_indices(40, 30.0, "dynamic_fps1", 64, 512) == list(range(40))
    # 2 frames -> [0, 1] padded to 4
    assert frame_indices(2, 30.0, "dynamic_fps1", 64, 512) == [0, 1, 1, 1]


def test_dynamic_fps1_indices_stage2_hand_worked():
    # 150 frames (5 s at 30 fps), stage 2 -> n = 4; linspace(0,150,5) = [0, 37.5, 75, 112.5, 150]
    # -> [0, 37, 75, 112, 150]; midpoints (0+36)//2=18, (37+74)//2=55, (75+111)//2=93, (112+149)//2=130
    assert frame_indices(150, 30.0, "dynamic_fps1", 1, 8) == [18, 55, 93, 130]


def test_start_end_span():
    # 300 frames at 30 fps, span [2 s, 6 s) -> frames [60, 180), 120 frames = 4 s -> n = 4 in stage 2
    # linspace(0,120,5) = [0,30,60,90,120] -> midpoints 14, 44, 74, 104 -> +60
    assert frame_indices(300, 30.0, "dynamic_fps1", 1, 8, start=2.0, end=6.0) == [74, 104, 134, 164]
    assert span_to_frames(300, 30.0, 2.0, 6.0) == (60, 180)
    assert span_to_frames(300, 30.0, None, 6.0) == (0, 180)
    assert span_to_frames(300, 30.0, 9.0, None) == (270, 300)
    # end past the video is clamped
    assert span_to_frames(300, 30.0, 8.0, 99.0) == (240, 300)


def test_start_end_with_middle_policy():
    # 100 frames at 10 fps, span [1 s, 9 s) -> [10, 90): 80 frames, 4 of them: linspace(0,80,5) step 20
    # midpoints 9, 29, 49, 69 -> +10
    assert frame_indices(100, 10.0, "middle", 0, 4, start=1.0, end=9.0) == [19, 39, 59, 79]


def test_bad_span_is_an_error():
    with pytest.raises(ValueError):
        frame_indices(300, 30.0, "dynamic_fps1", 1, 8, start=20.0, end=30.0)  # starts after the end
    with pytest.raises(ValueError):
        frame_indices(300, 30.0, "dynamic_fps1", 1, 8, start=5.0, end=4.0)


# -- the other policies ---------------------------------------------------------------------------


def test_middle_policy_is_a_fixed_count():
    # stage 1: exactly 4 frames whatever the duration
    assert frame_indices(1000, 30.0, "middle", 1, 4) == [124, 374, 624, 874]
    assert frame_indices(10, 30.0, "middle", 1, 4) == [0, 3, 5, 8]
    assert len(frame_indices(5, 1.0, "middle", 1, 16)) == 16  # padded


def test_fixed_fps_policy():
    # fps:2 on 10 s: 4 * floor(20 / 4) = 20, within [4, 64]
    assert frame_count(300, 30.0, "fps:2", 4, 64) == 20
    # policy="fps" with target_fps=0.5 on 100 s: 4 * floor(50 / 4) = 48
    assert frame_count(3000, 30.0, "fps", 4, 512, target_fps=0.5) == 48
    # fps:1 is dynamic_fps1
    for vlen in (40, 300, 6045, 30000):
        assert frame_indices(vlen, 30.0, "fps:1", 64, 512) == frame_indices(vlen, 30.0, "dynamic_fps1", 64, 512)


def test_unknown_policy_and_bad_bounds():
    with pytest.raises(ValueError):
        parse_policy("uniform")
    with pytest.raises(ValueError):
        frame_count(100, 10.0, "middle", 1, 6)  # not a multiple of 4
    with pytest.raises(ValueError):
        frame_count(100, 0.0, "dynamic_fps1", 1, 8)


def test_brute_force_properties():
    """Over a grid of lengths and rates: a multiple of 4, about 1 fps between the bounds, in range."""
    for fps in (1.0, 2.5, 8.0, 30.0):
        for vlen in range(1, 2000, 7):
            idx = frame_indices(vlen, fps, "dynamic_fps1", 64, 512)
            n = len(idx)
            assert n % 4 == 0 and 4 <= n <= 512
            assert all(0 <= i < vlen for i in idx) and idx == sorted(idx)
            duration = vlen / fps
            if vlen >= 64 and 64 <= duration <= 512:
                assert abs(n - duration) < 4  # about one frame per second
            if vlen >= 64 and duration < 64:
                assert n == 64
            if duration > 516:
                assert n == 512
            if vlen < 64:
                assert n == max(4, 4 * math.floor(vlen / 4))
