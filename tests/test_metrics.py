"""The DAVIS 2017 measures against values worked out by hand.

Facts used below (from the official davis2017-evaluation):
- seg2bmap marks a pixel that differs from its east, south or south-east neighbour; on the
  last row only east counts, on the last column only south, and the bottom-right corner
  never counts. So a lone interior pixel at (y, x) has the 4 boundary pixels
  (y-1, x-1), (y-1, x), (y, x-1), (y, x); a k x k square a ring of 4k pixels.
- F's tolerance is a disk of radius ceil(0.008 * hypot(H, W)): 2 px at 96x160
  (hypot = 186.6), 8 px at 480x854, 9 px at 480x910 (hypot = 1028.8).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from vos.metrics import (
    boundary_radius,
    db_statistics,
    dilate_disk,
    disk,
    evaluate_sequence,
    evaluate_sequences,
    f_measure,
    jaccard,
    per_sequence_means,
    seg2bmap,
)


def square(shape, y, x, k, value=1):
    m = np.zeros(shape, np.uint8)
    m[y : y + k, x : x + k] = value
    return m


# --- building blocks -------------------------------------------------------------------


def test_disk_is_skimage_disk():
    assert disk(0).tolist() == [[True]]
    assert disk(1).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    # (2, 1) is outside: 4 + 1 > 4; (1, 1) inside: 2 <= 4.
    assert disk(2).astype(int).tolist() == [
        [0, 0, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 0, 0],
    ]
    assert disk(8).sum() == sum(1 for y in range(-8, 9) for x in range(-8, 9) if x * x + y * y <= 64)


@pytest.mark.parametrize(
    "shape, expected", [((96, 160), 2), ((480, 854), 8), ((480, 910), 9), ((1, 1), 1), ((200, 400), 4)]
)
def test_boundary_radius(shape, expected):
    assert boundary_radius(shape) == expected
    assert boundary_radius(shape, bound_th=3) == 3  # >= 1 means pixels


@pytest.mark.parametrize("radius", [0, 1, 2, 5, 9])
@pytest.mark.parametrize("shape", [(1, 1), (4, 9), (9, 4), (37, 53)])
def test_dilate_disk_equals_scipy_binary_dilation(radius, shape):
    rng = np.random.default_rng(radius * 100 + shape[0])
    mask = rng.random(shape) < 0.05
    mask[0, -1] = True  # a pixel on the border: nothing may wrap around or come from outside
    ref = binary_dilation(mask, structure=disk(radius), border_value=0)
    np.testing.assert_array_equal(dilate_disk(mask, radius), ref)


def _pixels(b):
    return sorted(map(tuple, np.argwhere(b).tolist()))


def test_seg2bmap_by_hand():
    H, W = 6, 7
    assert _pixels(seg2bmap(square((H, W), 2, 3, 1))) == [(1, 2), (1, 3), (2, 2), (2, 3)]
    assert _pixels(seg2bmap(square((H, W), 0, 0, 1))) == [(0, 0)]  # top-left: nothing above or left
    # bottom-right: the corner itself never counts, its west and north neighbours (by the
    # last-row/last-column rules) and the north-west one do
    assert _pixels(seg2bmap(square((H, W), H - 1, W - 1, 1))) == [(H - 2, W - 2), (H - 2, W - 1), (H - 1, W - 2)]
    ring = seg2bmap(square((H, W), 1, 2, 3))
    assert ring.sum() == 12 and _pixels(ring) == sorted(
        [(y, x) for y in range(0, 4) for x in range(1, 5) if y in (0, 3) or x in (1, 4)]
    )
    assert not seg2bmap(np.ones((H, W))).any()  # a full frame has no boundary at all
    assert not seg2bmap(np.zeros((H, W))).any()
    # an object on the last column from row 2 to 4: 2 pixels on that column, 4 on the one before
    col = np.zeros((H, W), np.uint8)
    col[2:5, W - 1] = 1
    assert _pixels(seg2bmap(col)) == [(1, W - 2), (1, W - 1), (2, W - 2), (3, W - 2), (4, W - 2), (4, W - 1)]


def test_seg2bmap_resized_like_the_official_code():
    # (y, x) -> (y + floor(height / h), x + floor(width / h)) -- the official code divides
    # the width by h too. 4x4 mask, pixel (1, 1): boundary (0..1, 0..1) -> rows +0, cols +1.
    b = seg2bmap(square((4, 4), 1, 1, 1), width=4, height=2)
    assert b.shape == (2, 4)
    assert _pixels(b) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    with pytest.raises(ValueError, match="larger"):
        seg2bmap(square((4, 4), 1, 1, 1), width=5, height=4)


def test_jaccard_by_hand():
    shape = (10, 12)
    gt = square(shape, 2, 2, 4)
    assert jaccard(gt, np.roll(gt, 1, axis=1)) == pytest.approx(12 / 20)  # (k-1)k / (k+1)k
    assert jaccard(gt, gt) == 1.0
    assert jaccard(np.zeros(shape), np.zeros(shape)) == 1.0  # both empty
    assert jaccard(gt, np.zeros(shape)) == 0.0
    assert jaccard(np.zeros(shape), gt) == 0.0
    stacked = jaccard(np.stack([gt, gt, np.zeros(shape)]), np.stack([gt, 0 * gt, np.zeros(shape)]))
    np.testing.assert_allclose(stacked, [1.0, 0.0, 1.0])


class TestFMeasureByHand:
    shape = (96, 160)  # tolerance 2 px

    def far(self, m):
        m = m.copy()
        m[80, 150] = 1
        return m

    def test_empty_cases(self):
        z = np.zeros(self.shape, np.uint8)
        one = square(self.shape, 40, 40, 1)
        assert f_measure(z, z) == 1.0  # precision 1, recall 1
        assert f_measure(one, z) == 0.0  # precision 1, recall 0
        assert f_measure(z, one) == 0.0  # precision 0, recall 1

    def test_full_frame_has_no_boundary(self):
        full = np.ones(self.shape, np.uint8)
        z = np.zeros(self.shape, np.uint8)
        # both boundary maps are empty: F = 1 although J = 0
        assert f_measure(full, z) == 1.0 and jaccard(full, z) == 0.0

    def test_shift_within_tolerance(self):
        gt = square(self.shape, 30, 30, 10)
        for dy, dx in [(0, 1), (1, 1), (0, 2), (2, 0)]:
            assert f_measure(gt, np.roll(gt, (dy, dx), axis=(0, 1))) == 1.0

    def test_one_pixel_shifted_beyond_tolerance(self):
        # GT pixel at x, prediction at x + 3: each ring has columns {x-1, x} / {x+2, x+3};
        # only the nearer column of each (distance 2 = tolerance) matches: P = R = 2/4.
        gt = square(self.shape, 40, 40, 1)
        pred = square(self.shape, 40, 43, 1)
        assert f_measure(gt, pred) == pytest.approx(0.5)
        assert f_measure(gt, square(self.shape, 40, 44, 1)) == 0.0  # 3 px apart: nothing matches

    def test_extra_far_pixel(self):
        gt = square(self.shape, 40, 40, 1)
        # 4 of the 8 predicted boundary pixels match, all 4 GT ones do: P = 1/2, R = 1
        assert f_measure(gt, self.far(gt)) == pytest.approx(2 * 0.5 / 1.5)
        k = 5
        gt = square(self.shape, 20, 20, k)
        # P = 4k / (4k + 4), R = 1 -> F = 2k / (2k + 1); J = k^2 / (k^2 + 1)
        assert f_measure(gt, self.far(gt)) == pytest.approx(2 * k / (2 * k + 1))
        assert jaccard(gt, self.far(gt)) == pytest.approx(k * k / (k * k + 1))

    def test_objects_touching_corners(self):
        top_left = square(self.shape, 0, 0, 1)  # boundary: 1 pixel -> P = 1/5
        assert f_measure(top_left, self.far(top_left)) == pytest.approx(2 * 0.2 / 1.2)
        H, W = self.shape
        bottom_right = square(self.shape, H - 1, W - 1, 1)  # boundary: 3 pixels -> P = 3/7
        assert f_measure(bottom_right, self.far(bottom_right)) == pytest.approx(0.6)

    def test_symmetries(self):
        rng = np.random.default_rng(3)
        gt = square(self.shape, 10, 20, 30)
        gt[50:70, 100:140] = 1
        pred = np.roll(gt, (3, -4), axis=(0, 1)) | (rng.random(self.shape) < 0.01)
        f = f_measure(gt, pred)
        assert 0 < f < 1
        assert f_measure(pred, gt) == pytest.approx(f)  # P and R swap, F is symmetric
        assert f_measure(gt.T, pred.T) == pytest.approx(f)  # seg2bmap's rules swap under transposition


# --- per-object statistics -----------------------------------------------------------


def test_db_statistics_eight_frames_by_hand():
    # edges: round(linspace(1, 8, 5) + 1e-10) - 1 = [0, 2, 4, 5, 7]; bins include their right
    # edge: first = v[0:3], last = v[5:8]
    v = np.array([1, 1, 1, 0.5, 0.5, 0, 0, 0])
    mean, recall, decay = db_statistics(v)
    assert mean == pytest.approx(0.5)
    assert recall == pytest.approx(3 / 8)  # 0.5 is not > 0.5
    assert decay == pytest.approx(1.0)
    v = np.array([0.2, 0.9, 0.4, 1.0, 0.6, 0.7, 0.6, 0.8])
    assert db_statistics(v)[2] == pytest.approx(np.mean([0.2, 0.9, 0.4]) - np.mean([0.7, 0.6, 0.8]))


def test_db_statistics_short_and_long():
    # 4 frames: edges [0, 1, 2, 2, 3] -> first = v[0:2], last = v[2:4]
    assert db_statistics(np.array([1.0, 0.8, 0.2, 0.0])) == pytest.approx((0.5, 0.5, 0.8))
    assert db_statistics(np.array([0.7])) == pytest.approx((0.7, 1.0, 0.0))
    # 7 frames: linspace gives 2.5 and 5.5, which the official + 1e-10 rounds up (numpy alone
    # rounds 2.5 to even): edges [0, 2, 3, 5, 6] -> first = v[0:3], last = v[5:7]
    assert db_statistics(np.array([1, 1, 0, 0, 0, 0.5, 0.5]))[2] == pytest.approx(2 / 3 - 0.5)
    # NaNs are skipped like np.nanmean
    assert db_statistics(np.array([1.0, np.nan, 0.0, 0.0]))[0] == pytest.approx(1 / 3)
    # 300 frames: the official uint8 edges wrap (299 -> 43), the last bin v[224:44] is empty
    # and the decay NaN, as the official code reports it
    mean, recall, decay = db_statistics(np.linspace(1, 0, 300))
    assert mean == pytest.approx(0.5) and math.isnan(decay)


# --- sequences -------------------------------------------------------------------------


def test_first_and_last_frames_are_not_scored_and_objects_come_from_frame_0():
    shape = (96, 160)
    T = 5
    gt = np.zeros((T, *shape), np.uint8)
    gt[:, 10:20, 10:20] = 1
    gt[:, 50:60, 100:110] = 3  # ids 1 and 3: object 2 is scored although it is never there
    gt[2:, 70:75, 20:25] = 4  # appears after frame 0: not scored
    pred = gt.copy()
    pred[0] = 0
    pred[-1] = 0  # first and last frames are not looked at
    pred[pred == 4] = 0
    res = evaluate_sequence(pred, gt, name="s")
    assert sorted(res) == [1, 2, 3]
    for obj in (1, 2, 3):  # object 2: both empty on every frame -> J = F = 1
        np.testing.assert_array_equal(res[obj]["J"], np.ones(T - 2))
        np.testing.assert_array_equal(res[obj]["F"], np.ones(T - 2))


def test_void_is_background():
    shape = (96, 160)
    gt = np.zeros((3, *shape), np.uint8)
    gt[:, 10:20, 10:20] = 1
    gt[:, 10:20, 20:30] = 255  # void next to the object
    pred = np.zeros_like(gt)
    pred[:, 10:20, 10:30] = 1  # covers object and void: the void counts as a false positive
    res = evaluate_sequence(pred, gt)
    assert sorted(res) == [1]  # 255 is not an object
    assert res[1]["J"][0] == pytest.approx(100 / 200)
    # Rings (tolerance 2 px): GT rows 9..19 x cols 9..19 (40 px), prediction rows 9..19 x
    # cols 9..29 (60 px). Unmatched: GT's right side rows 12..16 (5 px); the prediction's
    # top and bottom cols 22..29 (16 px) and right side rows 10..18 (9 px).
    # P = 35/60, R = 35/40 -> F = 0.7.
    assert res[1]["F"][0] == pytest.approx(0.7)
    bg = np.where(gt == 255, 0, gt)
    assert res[1]["F"][0] == pytest.approx(f_measure(bg[1] == 1, pred[1] == 1))


def test_vanishing_reappearing_border_and_one_pixel_objects():
    shape = (96, 160)
    T = 6
    gt = np.zeros((T, *shape), np.uint8)
    pred = np.zeros_like(gt)
    gt[:, 40:44, 40:44] = 1
    gt[2:4, 40:44, 40:44] = 0  # object 1 vanishes on frames 2-3 and reappears
    pred[:, 40:44, 41:45] = 1  # shifted by one pixel: J = 12/20, F = 1 where GT is there
    pred[3, 40:44, 41:45] = 0  # frame 3: both empty -> 1, 1; frame 2: GT empty, pred not -> 0, 0
    gt[:, 90:96, 150:160] = 2  # touching the bottom and right borders, predicted exactly
    pred[:, 90:96, 150:160] = 2
    gt[:, 5, 7] = 3  # one pixel, predicted one pixel to the right (J = 0, F = 1 within 2 px)
    pred[:, 5, 8] = 3
    res = evaluate_sequence(pred, gt)
    np.testing.assert_allclose(res[1]["J"], [0.6, 0.0, 1.0, 0.6])
    np.testing.assert_allclose(res[1]["F"], [1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(res[2]["J"], 1.0)
    np.testing.assert_allclose(res[2]["F"], 1.0)
    np.testing.assert_allclose(res[3]["J"], 0.0)
    np.testing.assert_allclose(res[3]["F"], 1.0)


@pytest.mark.parametrize("shape", [(96, 160), (240, 427), (480, 910)])
def test_several_objects_at_several_sizes(shape):
    H, W = shape
    r = boundary_radius(shape)
    T = 4
    gt = np.zeros((T, H, W), np.uint8)
    pred = np.zeros_like(gt)
    k = 8
    gt[:, 10 : 10 + k, 10 : 10 + k] = 1
    pred[:, 10 : 10 + k, 11 : 11 + k] = 1  # shift 1: J = (k-1)/(k+1), F = 1
    gt[:, H - k :, W - k :] = 2  # corner object, predicted empty: J = 0, F = 0
    gt[:, 30, 60] = 3  # one pixel, predicted r + 1 px to the right: J = 0, F = 1/2
    pred[:, 30, 60 + r + 1] = 3
    res = evaluate_sequence(pred, gt, name=f"{H}x{W}")
    np.testing.assert_allclose(res[1]["J"], (k - 1) / (k + 1))
    np.testing.assert_allclose(res[1]["F"], 1.0)
    np.testing.assert_allclose(res[2]["J"], 0.0)
    np.testing.assert_allclose(res[2]["F"], 0.0)
    np.testing.assert_allclose(res[3]["J"], 0.0)
    np.testing.assert_allclose(res[3]["F"], 0.5)
    # the same numbers frame by frame from the building blocks
    for obj in (1, 2, 3):
        for t in range(1, T - 1):
            assert res[obj]["J"][t - 1] == jaccard(gt[t] == obj, pred[t] == obj)
            assert res[obj]["F"][t - 1] == f_measure(gt[t] == obj, pred[t] == obj)


def test_global_is_the_mean_over_objects_not_sequences():
    shape = (96, 160)
    gt_a = np.zeros((3, *shape), np.uint8)
    gt_a[:, 10:20, 10:20] = 1
    gt_a[:, 50:60, 50:60] = 2
    pred_a = gt_a.copy()
    pred_a[pred_a == 2] = 0  # object 2 lost: J = F = 0; object 1 perfect
    pred_a[1, 0, 0] = 2  # keep id 2 present in the scored frames (no warning); 1 px far away
    gt_b = np.zeros((3, *shape), np.uint8)
    gt_b[:, 30:40, 30:40] = 1
    res = evaluate_sequences({"a": pred_a, "b": gt_b.copy()}, {"a": gt_a, "b": gt_b})
    assert sorted(res["per_object"]) == ["a_1", "a_2", "b_1"]
    assert res["per_object"]["a_1"]["J-Mean"] == 1.0 and res["per_object"]["b_1"]["F-Mean"] == 1.0
    assert res["per_object"]["a_2"]["J-Mean"] == 0.0 and res["per_object"]["a_2"]["F-Mean"] == 0.0
    g = res["global"]
    assert g["J-Mean"] == pytest.approx(2 / 3)  # per-sequence means would give 0.75
    assert g["F-Mean"] == pytest.approx(2 / 3)
    assert g["J-Recall"] == pytest.approx(2 / 3)
    assert g["J&F-Mean"] == pytest.approx((g["J-Mean"] + g["F-Mean"]) / 2)
    assert g["J-Decay"] == 0.0
    seq = per_sequence_means(res, ["a", "b"])
    assert seq["a"]["objects"] == 2 and seq["a"]["J&F-Mean"] == pytest.approx(0.5)
    assert seq["b"]["J&F-Mean"] == pytest.approx(1.0)


def test_errors_and_warnings():
    shape = (96, 160)
    gt = np.zeros((4, *shape), np.uint8)
    gt[:, 10:20, 10:20] = 1
    gt[:, 40:50, 40:50] = 2
    bad = gt.copy()
    bad[2, 0, 0] = 3
    with pytest.raises(ValueError, match=r"f2\.png has id 3 .* 2 object"):
        evaluate_sequence(bad, gt, name="s", frame_names=[f"f{t}.png" for t in range(4)])
    with pytest.raises(ValueError, match="differ"):
        evaluate_sequence(gt[:, :-1], gt)
    with pytest.raises(ValueError, match="at least 3"):
        evaluate_sequence(gt[:2], gt[:2])
    with pytest.raises(TypeError, match="integer"):
        evaluate_sequence(gt.astype(np.float32), gt)
    with pytest.raises(ValueError, match="no entry"):
        evaluate_sequences({}, {"s": gt})
    lost = gt.copy()
    lost[lost == 2] = 0
    with pytest.warns(UserWarning, match=r"never contain id\(s\) 2\.\.2"):
        res = evaluate_sequence(lost, gt)
    np.testing.assert_allclose(res[2]["J"], 0.0)  # scored as an empty prediction
