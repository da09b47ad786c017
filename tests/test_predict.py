"""femurseg predict: geometry per input format, threshold / post-processing wiring, tiling, batch mode, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_3D, make_run
from helpers import ball, write_dicom_series

from femurseg.core import io
from femurseg.core.errors import FemursegError
from femurseg.inference import predict as P
from femurseg.inference.tiling import tile_starts, predict_prob

SHAPE, SPACING = (8, 20, 24), (1.5, 0.5, 0.5)


def femurseg(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "femurseg.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _scan(seed: int = 0) -> io.Volume:
    rng = np.random.default_rng(seed)
    img = ball(SHAPE, radius=3.0, spacing=SPACING) * 300.0 + rng.normal(100, 20, SHAPE)
    return io.make_volume(img.astype(np.float32), SPACING)


def _oblique(path: Path) -> Path:
    rng = np.random.default_rng(3)
    img = sitk.GetImageFromArray(rng.normal(100, 20, (7, 18, 22)).astype(np.float32))  # [k, j, i]
    theta = np.deg2rad(17.0)
    rot = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]])
    coronal = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)
    img.SetDirection(tuple((rot @ coronal).ravel()))
    img.SetSpacing((0.5, 0.5, 1.5))
    img.SetOrigin((10.0, -20.0, 5.0))
    sitk.WriteImage(img, str(path))
    return path


def _write_scan(fmt: str, folder: Path) -> Path:
    vol = _scan()
    if fmt == "dicom":
        write_dicom_series(vol, folder / "series")
        return folder / "series"
    if fmt == "oblique":
        return _oblique(folder / "oblique.nii.gz")
    return io.write_volume(folder / f"scan.{fmt}", vol)


@pytest.fixture(scope="module")
def predictor(run3d):
    return P.load_predictor(run3d, device="cpu")


# ---------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd", "mha", "dicom", "oblique"])
def test_output_geometry_equals_input_geometry(fmt, predictor, tmp_path):
    src = _write_scan(fmt, tmp_path)
    outs = P.outputs_for(tmp_path / "mask.nii.gz", prob=tmp_path / "prob.nii.gz")
    res = P.predict_file(predictor, src, outs, threshold="otsu", notify=lambda m: None)
    ref = io.read_image(src).geometry
    for path, pixel in ((outs.mask, sitk.sitkUInt8), (outs.prob, sitk.sitkFloat32)):
        img = sitk.ReadImage(str(path))
        assert img.GetPixelID() == pixel
        assert io.Geometry.from_sitk(img).matches(ref, tol=1e-5) is None, path
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(outs.mask)))
    assert set(np.unique(mask)) <= {0, 1} and mask.sum() == res.voxels > 0
    assert 0.0 <= sitk.GetArrayFromImage(sitk.ReadImage(str(outs.prob))).min()


def test_same_scan_in_every_file_format_gives_the_same_canonical_mask(predictor, tmp_path):
    masks = []
    for fmt in ("nii.gz", "nrrd", "mha"):
        src = _write_scan(fmt, tmp_path)
        out = tmp_path / f"mask_{fmt.replace('.', '_')}.nii.gz"
        P.predict_file(predictor, src, P.outputs_for(out), threshold="otsu")
        masks.append(io.read_image(out, dtype=None).data)
    assert all(np.array_equal(masks[0], m) for m in masks[1:])


# ---------------------------------------------------------------------------------------------- thresholds


def test_threshold_specs_are_wired_to_femurseg_thresholds(predictor):
    from femurseg.inference.postprocess import postprocess
    from femurseg.inference.thresholds import otsu_threshold

    vol = _scan()
    prob = P.predict_probability(predictor, vol)
    assert prob.shape == SHAPE and prob.dtype == np.float32
    cases = {"pr": 0.49, "youden": 0.47, "otsu": otsu_threshold(prob), 0.55: 0.55, "0.55": 0.55,
             None: 0.49}  # None: the run's stored PR threshold
    for spec, expected in cases.items():
        for mode in ("none", "lcc"):
            mask, thr = P.segment(prob, vol.spacing, threshold=spec, stored=predictor.thresholds, postprocess=mode)
            assert thr == pytest.approx(expected)
            assert mask.dtype == np.uint8
            assert np.array_equal(mask > 0, postprocess(prob >= expected, mode, vol.spacing))


def test_otsu_hand_computed_and_fallback_without_stored_threshold():
    prob = np.zeros((4, 6, 6), np.float32)
    prob[1:3, 1:4, 1:4] = 0.9
    prob[0, 0, 0] = 0.1
    mask, thr = P.segment(prob, (1, 1, 1), threshold="otsu", postprocess="none")
    assert 0.1 <= thr < 0.9  # any cut between the two modes; femur voxels exactly the 0.9 block
    assert mask.sum() == 2 * 3 * 3
    notes = []
    mask, thr = P.segment(prob, (1, 1, 1), threshold=None, stored={}, postprocess="none", notify=notes.append)
    assert thr == 0.5 and mask.sum() == 18 and "0.5" in notes[0]
    with pytest.raises(FemursegError, match="no stored 'youden'"):
        P.segment(prob, (1, 1, 1), threshold="youden", stored={"pr": 0.4})
    with pytest.raises(FemursegError, match=r"\[0, 1\]"):
        P.segment(prob, (1, 1, 1), threshold=1.5)


# ---------------------------------------------------------------------------------------------- post-processing


def test_postprocess_modes_on_constructed_probability_map():
    prob = np.zeros((10, 12, 12), np.float32)
    prob[1:8, 1:9, 1:9] = 0.9          # the femur: a 7 x 8 x 8 block ...
    prob[4, 4:6, 4:6] = 0.1            # ... with an internal hole of 4 voxels
    prob[9, 10:12, 10:12] = 0.8        # and a separate false-positive island of 4 voxels
    sp = (1.0, 1.0, 1.0)
    none, _ = P.segment(prob, sp, threshold=0.5, postprocess="none")
    lcc, _ = P.segment(prob, sp, threshold=0.5)  # default: lcc
    fill, _ = P.segment(prob, sp, threshold=0.5, postprocess="lcc+fill")
    assert none.sum() == 7 * 8 * 8 - 4 + 4
    assert lcc.sum() == 7 * 8 * 8 - 4 and lcc[9].sum() == 0
    assert fill.sum() == 7 * 8 * 8 and fill[4, 4:6, 4:6].all()
    small, _ = P.segment(prob, sp, threshold=0.5, postprocess="none", min_size_mm3=5.0)
    assert small[9].sum() == 0 and small.sum() == 7 * 8 * 8 - 4
    with pytest.raises(FemursegError, match="--postprocess"):
        P.segment(prob, sp, threshold=0.5, postprocess="biggest")


# ---------------------------------------------------------------------------------------------- tiling


def _models(run):
    from femurseg.inference.run import load_run

    return load_run(run).load_models("all", "cpu")


def test_sliding_window_reproduces_whole_volume_for_padded_model(run3d):
    models = _models(run3d)[:1]
    img = np.random.default_rng(0).normal(size=(12, 24, 28)).astype(np.float32)
    whole = predict_prob(models, img)
    covering = predict_prob(models, img, patch_size=(12, 24, 28), overlap=0.5)
    assert np.abs(whole - covering).max() <= 1e-5
    windowed = predict_prob(models, img, patch_size=(8, 16, 16), overlap=0.5)
    d = np.abs(whole - windowed)
    assert windowed.shape == whole.shape and d.mean() < 0.01 and d.max() < 0.15


def test_memory_window_is_used_above_max_voxels(run3d):
    pred = P.load_predictor(run3d, device="cpu")
    shape = (12, 24, 28)
    assert "patch_size" not in P.inference_options(pred, shape)
    pred.max_voxels = 12 * 24 * 28 // 3
    opts = P.inference_options(pred, shape)
    assert int(np.prod(opts["patch_size"])) <= pred.max_voxels and opts["overlap"] == 0.5
    assert all(p % 4 == 0 for p in opts["patch_size"])  # multiples of the U-Net's size divisor (2 levels)
    img = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    whole = predict_prob(pred.models, img)
    windowed = P._predict_preprocessed(pred, img)
    assert windowed.shape == shape and np.abs(whole - windowed).mean() < 0.01


@pytest.mark.parametrize("tiles", [9, 49])
def test_mirrored_tiling_unpadded_2d_full_size_and_tile_count(run2d_unpadded, tiles):
    pred = P.load_predictor(run2d_unpadded, device="cpu")
    pred.tiles = tiles
    shape = (2, 40, 48)
    opts = P.inference_options(pred, shape)
    n = int(np.sqrt(tiles))
    assert [len(tile_starts(s, t, opts["overlap"])) for s, t in zip(shape[1:], opts["patch_size"])] == [n, n]
    seen = []
    hook = pred.models[0].register_forward_hook(lambda m, inp, out: seen.append((inp[0].shape[0], out.shape[2:])))
    try:
        img = np.random.default_rng(2).normal(size=shape).astype(np.float32)
        prob = P._predict_preprocessed(pred, img)
    finally:
        hook.remove()
    assert prob.shape == shape and np.isfinite(prob).all() and 0 <= prob.min() and prob.max() <= 1
    assert sum(b for b, _ in seen) == tiles * shape[0]  # every slice through n x n tiles
    assert all(tuple(o) >= tuple(opts["patch_size"]) for _, o in seen)  # each tile's output covers its patch
    pred.tiles = 1  # one mirrored tile per slice: the cv's path
    single = P._predict_preprocessed(pred, img)
    assert np.abs(single - prob).mean() < 0.02


def test_tta_flip_averages_the_mirrored_prediction(predictor):
    vol = _scan()
    plain = P.predict_probability(predictor, vol)
    both = P.predict_probability(predictor, vol, tta="flip")
    mirrored = P.predict_probability(predictor, vol.with_data(np.ascontiguousarray(vol.data[..., ::-1])))
    assert np.allclose(both, 0.5 * (plain + mirrored[..., ::-1]), atol=1e-5)


def test_single_fold_and_ensemble(run3d):
    vol = _scan()
    p0 = P.predict_probability(P.load_predictor(run3d, folds="0", device="cpu"), vol)
    p1 = P.predict_probability(P.load_predictor(run3d, folds=1, device="cpu"), vol)
    both = P.predict_probability(P.load_predictor(run3d, device="cpu"), vol)
    assert np.allclose(both, (p0 + p1) / 2, atol=1e-5) and not np.allclose(p0, p1)
    with pytest.raises(FemursegError, match="no fold 5"):
        P.load_predictor(run3d, folds="5")


# ---------------------------------------------------------------------------------------------- outputs


def test_preview_and_probability_written_together(predictor, tmp_path):
    src = _write_scan("nii.gz", tmp_path)
    outs = P.outputs_for(tmp_path / "out" / "case.nii.gz", prob=tmp_path / "out" / "case_prob.nii.gz", preview=True)
    (tmp_path / "out").mkdir()
    P.predict_file(predictor, src, outs, threshold="otsu")
    assert outs.preview == tmp_path / "out" / "case_preview.png"
    assert outs.preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case.nii.gz", "case_preview.png", "case_prob.nii.gz",
                                                                 "case_qc.json"]


def test_expand_inputs(tmp_path):
    (tmp_path / "scans").mkdir()
    a = io.write_volume(tmp_path / "scans" / "a.nii.gz", _scan())
    b = io.write_volume(tmp_path / "scans" / "b.mha", _scan(1))
    write_dicom_series(_scan(2), tmp_path / "scans" / "c")
    assert P.expand_inputs([a]) == ([a], False)
    assert P.expand_inputs([tmp_path / "scans" / "c"]) == ([tmp_path / "scans" / "c"], False)  # a DICOM series
    scans, batch = P.expand_inputs([tmp_path / "scans"])
    assert batch and [P.case_name(s) for s in scans] == ["a", "b", "c"]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# scans\n{a}\n\nscans/b.mha\n")
    assert P.expand_inputs([lst]) == ([a, tmp_path / "scans" / "b.mha"], True)
    assert P.expand_inputs([a, b]) == ([a, b], True)


# ---------------------------------------------------------------------------------------------- CLI, batch, errors


def _assert_one_line_error(r, *needles):
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("femurseg: error: ")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_batch_with_one_corrupt_scan(run3d, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    io.write_volume(scans / "a.nii.gz", _scan(0))
    io.write_volume(scans / "c.nrrd", _scan(2))
    good = (scans / "a.nii.gz").read_bytes()
    (scans / "b.nii.gz").write_bytes(good[: len(good) // 2])  # truncated
    out = tmp_path / "masks"
    r = femurseg("predict", run3d, "-i", scans, "-o", out, "--threshold", "otsu", "--quiet")
    assert r.returncode == P.EXIT_SOME_FAILED, r.stderr
    assert "segmented 2 of 3 scans, 1 failed" in r.stdout
    assert "b.nii.gz" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "a_qc.json", "c.nii.gz", "c_qc.json", "predictions.csv"]
    assert io.read_image(out / "c.nii.gz").geometry.matches(io.read_image(scans / "c.nrrd").geometry) is None


def test_cli_single_scan(run3d, tmp_path):
    src = _write_scan("nii.gz", tmp_path)
    out = tmp_path / "m.nii.gz"
    r = femurseg("predict", run3d, "-i", src, "-o", out, "--prob", tmp_path / "p.nii.gz", "--folds", "1")
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "threshold 0.49" in r.stdout and out.exists()
    # a one-line error and exit 1, checked before the run is even loaded
    _assert_one_line_error(femurseg("predict", run3d, "-i", src, "-o", tmp_path / "nope" / "m.nii.gz"), "does not exist")


def _command_error(run, src, out, **kw) -> str:
    with pytest.raises(FemursegError) as info:
        P.predict_command(run, [src], out, progress=False, echo=lambda m: None, notify=lambda m: None, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_outputs_options_and_inputs_fail_cleanly(run3d, tmp_path, monkeypatch):
    src = _write_scan("nii.gz", tmp_path)
    out = tmp_path / "m.nii.gz"
    # output problems are found before the run is loaded or the scan read
    import femurseg.inference.predict as mod

    monkeypatch.setattr(mod, "load_predictor", lambda *a, **k: pytest.fail("loaded the run before checking outputs"))
    assert "does not exist" in _command_error(run3d, src, tmp_path / "nope" / "m.nii.gz")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):  # root can write anyway
            assert "not writable" in _command_error(run3d, src, ro / "m.nii.gz")
            assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
    assert "must end in" in _command_error(run3d, src, tmp_path / "m.png")
    assert "[0, 1]" in _command_error(run3d, src, out, threshold="2")
    assert "--postprocess" in _command_error(run3d, src, out, postprocess="biggest")
    assert "--tiles" in _command_error(run3d, src, out, tiles=8)
    assert "DICOM series folder" in _command_error(run3d, src, out, dicom_seg=True)
    assert "no such file" in _command_error(run3d, tmp_path / "missing.nii.gz", out)
    monkeypatch.undo()
    assert "not a femurseg run" in _command_error(tmp_path, src, out)
    assert "no stored 'youden'" in _command_error(make_run(tmp_path / "r", TINY_3D, k=1), src, out, threshold="youden")

    # not a 3D image; multi-channel: one message, no output
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 12), np.float32)), str(flat))
    msg = _command_error(run3d, flat, tmp_path / "f.nii.gz")
    assert "flat.nii.gz" in msg and "3D" in msg
    rgb = tmp_path / "rgb.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 10, 12, 3), np.float32), isVector=True), str(rgb))
    assert "channels" in _command_error(run3d, rgb, tmp_path / "g.nii.gz")
    assert not (tmp_path / "f.nii.gz").exists() and not (tmp_path / "g.nii.gz").exists() and not out.exists()


def test_missing_checkpoint_and_channel_mismatch(tmp_path):
    run = make_run(tmp_path / "run", TINY_3D, k=2)
    (run / "fold_1" / "best.pt").unlink()
    with pytest.raises(FemursegError, match="fold 1"):
        P.load_predictor(run)
    assert len(P.load_predictor(run, folds="0").models) == 1
    two = make_run(tmp_path / "two", {**TINY_3D, "in_channels": 2}, k=1)
    with pytest.raises(FemursegError, match="expects 2 channels"):
        P.check_volume(P.load_predictor(two), _scan())


def test_spacing_far_from_training_warns_but_predicts(tmp_path):
    run = make_run(tmp_path / "run", TINY_3D, k=1, extra={"train_spacing": [1.5, 0.25, 0.25]})
    pred = P.load_predictor(run, device="cpu")
    src = io.write_volume(tmp_path / "s.nii.gz", _scan())
    notes: list[str] = []
    P.predict_file(pred, src, P.outputs_for(tmp_path / "m.nii.gz"), threshold=0.5, notify=notes.append)
    assert (tmp_path / "m.nii.gz").exists()
    assert not any("spacing" in n for n in notes)  # 0.5 vs 0.25: a factor 2 is tolerated
    coarse = io.make_volume(_scan().data, (1.5, 1.2, 1.2))
    io.write_volume(tmp_path / "c.nii.gz", coarse)
    P.predict_file(pred, tmp_path / "c.nii.gz", P.outputs_for(tmp_path / "mc.nii.gz"), threshold=0.5, notify=notes.append)
    assert any("warning" in n and "spacing" in n for n in notes)


def test_cascade_hook_is_explicit(tmp_path):
    run = make_run(tmp_path / "run", TINY_3D, k=1, extra={"task": "cascade"})
    with pytest.raises(FemursegError, match="cascade"):
        P.predict_probability(P.load_predictor(run), _scan())


def test_no_partial_outputs_when_a_late_step_fails(predictor, tmp_path, monkeypatch):
    src = _write_scan("nii.gz", tmp_path)
    import femurseg.core.preview as preview

    def boom(*a, **k):
        raise FemursegError("preview failed")

    monkeypatch.setattr(preview, "save_montage", boom)
    outs = P.outputs_for(tmp_path / "o" / "m.nii.gz", prob=tmp_path / "o" / "p.nii.gz", preview=True)
    (tmp_path / "o").mkdir()
    with pytest.raises(FemursegError, match="preview failed"):
        P.predict_file(predictor, src, outs, threshold=0.5)
    assert list((tmp_path / "o").iterdir()) == []
