"""evaluate.py end to end: scoring folders, the copy baseline over datasets, outputs, errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate
from vos.metrics import evaluate_sequences
from vos.masks import read_mask, write_mask

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis-sample"
K = 8  # side of the test squares


def run(argv, capsys):
    rc = evaluate.main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def two_object_sequence(T=5, shape=(96, 160)):
    gt = np.zeros((T, *shape), np.uint8)
    gt[:, 10 : 10 + K, 10 : 10 + K] = 1
    gt[:, 50:70, 100:130] = 2
    pred = gt.copy()
    pred[pred == 1] = 0
    pred[:, 10 : 10 + K, 11 : 11 + K] = 1  # shifted one pixel: J = (K-1)/(K+1), F = 1
    return gt, pred


def write_sequence(folder: Path, masks, frames=None, binary=False):
    folder.mkdir(parents=True, exist_ok=True)
    for t, m in enumerate(masks):
        if frames is not None and t not in frames:
            continue
        if binary:
            Image.fromarray((m > 0).astype(np.uint8) * 255, mode="L").save(folder / f"{t:05d}.png")
        else:
            write_mask(folder / f"{t:05d}.png", m)


@pytest.fixture
def folders(tmp_path):
    """GT: alpha (palette, 2 objects, <seq>/<frame>.png), beta (8-bit 0/255, <seq>/Annotations/).
    Predictions: alpha without its first and last frames (never scored), beta exact."""
    gt_a, pred_a = two_object_sequence()
    gt_b = np.zeros((4, 120, 200), np.uint8)
    gt_b[:, 30:60, 40:90] = 1
    gt_b[2, 30:60, 40:90] = 0  # vanishes on one frame
    write_sequence(tmp_path / "gt" / "alpha", gt_a)
    write_sequence(tmp_path / "gt" / "beta" / "Annotations", gt_b, binary=True)
    write_sequence(tmp_path / "pred" / "alpha", pred_a, frames=range(1, len(pred_a) - 1))
    write_sequence(tmp_path / "pred" / "beta", gt_b)
    return tmp_path, {"alpha": gt_a, "beta": gt_b}, {"alpha": pred_a, "beta": gt_b}


def test_scores_a_folder_end_to_end(folders, capsys):
    root, gts, preds = folders
    out = root / "res" / "results.json"
    rc, stdout, _ = run(["--predictions", root / "pred", "--ground-truth", root / "gt", "--out", out], capsys)
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"global", "per_object"}
    assert list(res["global"]) == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    assert sorted(res["per_object"]) == ["alpha_1", "alpha_2", "beta_1"]
    assert res["per_object"]["alpha_1"]["J-Mean"] == pytest.approx((K - 1) / (K + 1))
    assert res["per_object"]["alpha_1"]["F-Mean"] == 1.0
    assert res["per_object"]["alpha_2"]["J-Mean"] == 1.0
    assert res["per_object"]["beta_1"]["J-Mean"] == 1.0  # 0/255 read as object 1, empty frame = 1
    assert res["global"]["J-Mean"] == pytest.approx(((K - 1) / (K + 1) + 2) / 3)
    assert res["global"]["J&F-Mean"] == pytest.approx((res["global"]["J-Mean"] + res["global"]["F-Mean"]) / 2)
    # the same numbers as the library function on the arrays
    direct = evaluate_sequences(preds, gts)
    assert res["global"] == pytest.approx(direct["global"])
    # the official CSVs
    rows = list(csv.reader((root / "res" / "global_results-val.csv").open()))
    assert rows[0] == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    assert rows[1][1] == f"{res['global']['J-Mean']:.3f}"
    rows = list(csv.reader((root / "res" / "per-sequence_results-val.csv").open()))
    assert rows[0] == ["Sequence", "J-Mean", "F-Mean"]
    assert rows[1] == ["alpha_1", f"{(K - 1) / (K + 1):.3f}", "1.000"]
    # the printed table: one line per sequence, then the global line
    assert "alpha" in stdout and "beta" in stdout and f"J&F-Mean {res['global']['J&F-Mean']:.3f}" in stdout
    assert not list((root / "res").glob(".*.tmp"))  # atomic writes leave no temp files


def test_sequences_subset_and_davis_root(tmp_path, capsys):
    gt, pred = two_object_sequence(T=4)
    for name in ("one", "two"):
        write_sequence(tmp_path / "DAVIS" / "Annotations" / "480p" / name, gt)
        write_sequence(tmp_path / "pred" / name, pred if name == "one" else gt)
    (tmp_path / "DAVIS" / "ImageSets" / "2017").mkdir(parents=True)
    (tmp_path / "DAVIS" / "ImageSets" / "2017" / "val.txt").write_text("two\n")
    out = tmp_path / "r.json"
    rc, _, _ = run(["--predictions", tmp_path / "pred", "--ground-truth", tmp_path / "DAVIS", "--out", out], capsys)
    assert rc == 0 and sorted(json.loads(out.read_text())["per_object"]) == ["two_1", "two_2"]  # from val.txt
    rc, _, _ = run(["--predictions", tmp_path / "pred", "--ground-truth", tmp_path / "DAVIS", "--out", out,
                    "--sequences", "one"], capsys)
    res = json.loads(out.read_text())
    assert rc == 0 and sorted(res["per_object"]) == ["one_1", "one_2"]
    assert res["per_object"]["one_1"]["J-Mean"] == pytest.approx((K - 1) / (K + 1))


def _rgb(path: Path):
    Image.fromarray(np.zeros((96, 160, 3), np.uint8)).save(path)


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda r: (r / "pred" / "alpha" / "00002.png").unlink(), "pred/alpha/00002.png"),
        (lambda r: write_mask(r / "pred" / "alpha" / "00002.png", np.zeros((96, 161), np.uint8)), "pred/alpha/00002.png"),
        (lambda r: write_mask(r / "pred" / "alpha" / "00003.png", np.full((96, 160), 3, np.uint8)), "pred/alpha/00003.png"),
        (lambda r: _rgb(r / "pred" / "alpha" / "00001.png"), "pred/alpha/00001.png"),
        (lambda r: _rgb(r / "gt" / "alpha" / "00000.png"), "gt/alpha/00000.png"),
        (lambda r: [p.unlink() for p in (r / "pred" / "beta").iterdir()] and (r / "pred" / "beta").rmdir(), "pred/beta"),
        (lambda r: [(r / "gt" / "beta" / "Annotations" / f"0000{t}.png").unlink() for t in (2, 3)], "gt/beta/Annotations"),
    ],
    ids=["missing-frame", "size-mismatch", "id-not-in-gt", "rgb-prediction", "rgb-ground-truth", "missing-sequence",
         "too-few-frames"],
)
def test_bad_input_is_an_error_naming_the_file(folders, capsys, damage, named):
    root, _, _ = folders
    damage(root)
    out = root / "res" / "results.json"
    rc, _, err = run(["--predictions", root / "pred", "--ground-truth", root / "gt", "--out", out], capsys)
    assert rc == 2
    assert "error" in err and named in err
    assert not out.exists()


def test_tolerated_cases_warn(folders, capsys):
    root, gts, _ = folders
    gt = gts["alpha"].copy()
    gt[:, 80:90, 0:20] = 255  # void
    write_sequence(root / "gt" / "alpha", gt)
    lost = gt.copy()
    lost[lost != 1] = 0  # object 2 never predicted
    write_sequence(root / "pred" / "alpha", lost)
    write_mask(root / "pred" / "alpha" / "99999.png", np.zeros((96, 160), np.uint8))  # no GT frame
    out = root / "r.json"
    rc, _, err = run(["--predictions", root / "pred", "--ground-truth", root / "gt", "--out", out], capsys)
    assert rc == 0
    assert "void (255)" in err and "scored as empty" in err and "99999.png" in err
    assert json.loads(out.read_text())["per_object"]["alpha_2"]["J-Mean"] == 0.0


def test_help_says_which_cases_warn(capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "errors" in text and "warnings" in text and "missing prediction frame" in text


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"the DAVIS sample data is not at {SAMPLE}")
def test_copy_baseline_on_davis_sample(tmp_path, capsys):
    out = tmp_path / "copy"
    rc, stdout, _ = run(["--baseline", "copy", "--data", SAMPLE, "--out", out, "--sequences", "scooter-black",
                         "kite-surf"], capsys)
    assert rc == 0 and "frames/s" in stdout
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["per_object"]) == ["kite-surf_1", "scooter-black_1"]
    for seq in ("kite-surf", "scooter-black"):
        gt = [np.asarray(Image.open(p)) == 255 for p in sorted((SAMPLE / seq / "Annotations").glob("*.png"))]
        # J of the copy baseline, straight from numpy: IoU of frame 0 with each scored frame
        j = [np.logical_and(gt[0], g).sum() / np.logical_or(gt[0], g).sum() for g in gt[1:-1]]
        assert res["per_object"][f"{seq}_1"]["J-Mean"] == pytest.approx(np.mean(j), abs=1e-12)
        written = sorted((out / "masks" / seq).glob("*.png"))
        assert len(written) == len(gt)
        with Image.open(written[-1]) as img:
            assert img.mode == "P"
        np.testing.assert_array_equal(read_mask(written[-1]), gt[0].astype(np.uint8))
        assert len(list((out / "overlays" / seq).glob("*.jpg"))) == len(gt)
        with Image.open(out / "overlays" / f"{seq}.gif") as gif:
            assert gif.n_frames == len(gt)
    assert 0.0 < res["global"]["J&F-Mean"] < 1.0
    # scoring the written masks as a prediction folder gives the same results
    rc, _, _ = run(["--predictions", out / "masks", "--ground-truth", SAMPLE, "--out", tmp_path / "again.json"], capsys)
    assert rc == 0 and json.loads((tmp_path / "again.json").read_text()) == res


def test_copy_baseline_on_synthetic(tmp_path, capsys):
    out = tmp_path / "syn"
    rc, stdout, _ = run(["--baseline", "copy", "--data", "synthetic", "--synthetic-videos", "2", "--synthetic-frames",
                         "5", "--out", out], capsys)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    seqs = sorted({k.rsplit("_", 1)[0] for k in res["per_object"]})
    assert len(seqs) == 2
    for seq in seqs:
        assert len(list((out / "masks" / seq).glob("*.png"))) == 5
        assert len(list((out / "overlays" / seq).glob("*.jpg"))) == 5
    speed = json.loads((out / "speed.json").read_text())
    assert speed["frames"] == 10 and speed["fps"] > 0 and speed["peak_memory_mib"] > 0


def test_youtube_vos_layout_with_a_late_object(tmp_path, capsys):
    base = tmp_path / "ytvos" / "valid"
    shape = (48, 64)
    first = np.zeros(shape, np.uint8)
    first[5:15, 5:15] = 1
    late = np.zeros(shape, np.uint8)
    late[30:40, 40:50] = 2
    (base / "JPEGImages" / "v1").mkdir(parents=True)
    for t in range(4):
        Image.fromarray(np.full((*shape, 3), 60 * t, np.uint8)).save(base / "JPEGImages" / "v1" / f"{t:05d}.jpg")
    write_mask(base / "Annotations" / "v1" / "00000.png", first)
    write_mask(base / "Annotations" / "v1" / "00002.png", late)
    meta = {"videos": {"v1": {"objects": {"1": {"frames": ["00000", "00001"]}, "2": {"frames": ["00002", "00003"]}}}}}
    (base / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    rc, stdout, _ = run(["--baseline", "copy", "--data", tmp_path / "ytvos", "--out", out, "--no-overlays"], capsys)
    assert rc == 0 and "nothing scored" in stdout
    masks = [read_mask(out / "masks" / "Annotations" / "v1" / f"{t:05d}.png") for t in range(4)]
    np.testing.assert_array_equal(masks[1], first)  # object 2 is not known yet
    np.testing.assert_array_equal(masks[3], np.maximum(first, late))  # then both are carried on


def test_command_line_mistakes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--baseline", "copy"])  # no --data
    with pytest.raises(SystemExit):
        evaluate.main(["--predictions", str(tmp_path)])  # no --ground-truth
    with pytest.raises(SystemExit):
        evaluate.main(["--predictions", str(tmp_path), "--baseline", "copy", "--data", "synthetic"])
    rc, _, err = run(["--predictions", tmp_path / "nope", "--ground-truth", tmp_path], capsys)
    assert rc == 2 and "--ground-truth" in err


def test_checkpoint_through_the_propagator(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from models import SST
    from vos.checkpoint import save_checkpoint
    from vos.synthetic import validation_videos

    from dataclasses import asdict

    from vos.config import DataConfig, EvalConfig, ModelConfig, RunConfig

    config = RunConfig(model=ModelConfig(dim=16, depth=1, heads=2, decoder_dim=8, backbone_width=8, attn="local", tau=2,
                                         backbone="small", backbone_stride=4, label_prior=False),
                       data=DataConfig(crop=32, max_objects=2), eval=EvalConfig(val_videos=1, val_frames=4))
    model = SST(**asdict(config.model))
    save_checkpoint(tmp_path / "run" / "ckpt.pt", {"model": model.state_dict(), "config": config.to_dict()})
    out = tmp_path / "eval"
    rc, stdout, _ = run(["--checkpoint", tmp_path / "run" / "ckpt.pt", "--data", "synthetic", "--out", out,
                         "--device", "cpu"], capsys)
    assert rc == 0 and "frames/s" in stdout
    # the checkpoint's own validation settings were used: one 4-frame 32x32 video
    (name, video, labels), = validation_videos(1, 4, 32, 32, 2)
    pred = np.stack([read_mask(out / "masks" / name / f"{t:05d}.png") for t in range(4)])
    assert pred.shape == (4, 32, 32)
    np.testing.assert_array_equal(pred[0], labels[0].numpy())  # the given mask on its own frame
    assert set(np.unique(pred)) <= set(np.unique(labels[0].numpy()))
    res = json.loads((out / "results.json").read_text())
    direct = evaluate_sequences({name: pred}, {name: labels.numpy().astype(np.uint8)})
    assert res["global"] == pytest.approx(direct["global"])
    assert res["per_object"].keys() == direct["per_object"].keys()
    for key, stats in direct["per_object"].items():
        assert res["per_object"][key] == pytest.approx(stats)
    with Image.open(out / "overlays" / f"{name}.gif") as gif:
        assert gif.n_frames == 4
    speed = json.loads((out / "speed.json").read_text())
    assert speed["frames"] == 4 and speed["device"] == "cpu"
    # at a reduced inference size the masks still come out, and are scored, at full size
    out2 = tmp_path / "eval-small"
    rc, _, _ = run(["--checkpoint", tmp_path / "run" / "ckpt.pt", "--data", "synthetic", "--out", out2,
                    "--device", "cpu", "--infer-short-side", "16", "--no-overlays"], capsys)
    assert rc == 0
    small = np.stack([read_mask(out2 / "masks" / name / f"{t:05d}.png") for t in range(4)])
    assert small.shape == (4, 32, 32)
    np.testing.assert_array_equal(small[0], labels[0].numpy())
    assert json.loads((out2 / "results.json").read_text())["per_object"].keys() == direct["per_object"].keys()


def test_overlay_and_gif(tmp_path):
    from vos.masks import davis_palette
    from vos.visualize import overlay, save_gif

    palette = np.asarray(davis_palette()).reshape(256, 3)
    image = np.full((20, 30, 3), 100, np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:20] = 2
    out = overlay(image, mask, alpha=0.25)
    assert (out[0, 0] == 100).all()  # background untouched
    assert (out[10, 15] == np.rint(0.25 * 100 + 0.75 * palette[2])).all()  # inside: blended
    assert (out[5, 15] == palette[2]).all() and (out[10, 10] == palette[2]).all()  # outline: full colour
    assert (out[4, 15] == 100).all()  # the outline stays inside the object
    with pytest.raises(ValueError, match="mask"):
        overlay(image, mask[:-1])
    with pytest.raises(ValueError, match="uint8"):
        overlay(image.astype(np.float32), mask)
    save_gif(tmp_path / "a.gif", [out, image, out], fps=5, max_width=15)
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (15, 10) and gif.info["duration"] == 200
    with pytest.raises(ValueError, match="no frames"):
        save_gif(tmp_path / "b.gif", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif"]
