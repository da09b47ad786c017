"""The benchmark suite runs end to end on tiny inputs (so it cannot rot); nothing is timed here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_ceiling  # noqa: E402
import bench_inference  # noqa: E402
import bench_training  # noqa: E402
import common  # noqa: E402
import run_all  # noqa: E402

pytest.importorskip("monai")


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    inf = bench_inference.run("tiny", repeats=1, levers=("fused",), log=quiet, opt_in=("bf16",))
    common.write_csv(inf["rows"], out / "inference_paper.csv")
    common.write_csv(inf["rows"], out / "levers_demo.csv")
    tr = bench_training.run("tiny", repeats=1, log=quiet)
    common.write_csv(tr["rows"], out / "training_demo.csv")
    ce = bench_ceiling.run("tiny", repeats=1, network_times={"plain": [0.5], "femurseg-network": [0.25]},
                           network_cpu={"plain": [1.0], "femurseg-network": [0.5]}, log=quiet)
    common.write_csv(ce["rows"], out / "ceiling_paper.csv")
    import bench_metrics

    met = bench_metrics.run(shape=(8, 48, 48), spacing=(1.5, 0.9, 0.9), repeats=1)
    bench_metrics.write_csv(met, out / "metrics.csv")
    return out


def test_inference_rows(results):
    rows = common.read_csv(results / "inference_paper.csv")
    engines = [r["engine"] for r in rows]
    assert engines == ["femurseg", "femurseg-network", "monai", "plain", "femurseg[bf16]", "accel[fused]"]
    for r in rows:
        assert float(r["seconds_median"]) > 0
        float32 = "bf16" not in r["engine"] and r.get("accel_mode", "") in ("", "none", "fused", "channels-last")
        # float32 engines agree; the default path may be "mixed" bfloat16 (on CPUs that have it)
        assert float(r["dice_vs_plain_fp32"]) >= (0.999 if float32 else 0.99), r
        assert r["cpu"] and r["cores"] and r["date"]


def test_training_rows(results):
    rows = common.read_csv(results / "training_demo.csv")
    assert [r["engine"] for r in rows] == ["femurseg", "femurseg-preset", "plain"]
    assert all(float(r["seconds_per_step_median"]) > 0 for r in rows)


def test_ceiling_rows(results):
    rows = common.read_csv(results / "ceiling_paper.csv")
    kernels = {r["kernel"] for r in rows}
    assert {"matmul_fp32", "matmul_bf16", "conv3x3x3_fp32_ncdhw"} <= kernels
    assert "network_forward[plain]" in kernels
    assert all(float(r["gflops"]) > 0 for r in rows)


def test_ceiling_times_the_network_itself():
    res = bench_ceiling.run("tiny", repeats=1, log=quiet)
    names = [r["kernel"] for r in res["rows"] if r["kernel"].startswith("network_forward")]
    assert len(names) == 3 and res["network_flop"] > 0


def test_summary(results):
    path = run_all.write_summary(results)
    text = path.read_text()
    for heading in ("## Targets", "## 1. Inference", "## 3. Training", "## 4. Machine ceiling",
                    "## 5. Surface distances", "## Levers, demo size"):
        assert heading in text
    assert "AMD" in text or "Intel" in text or "cores" in text


def test_peak_rss_sees_an_allocation():
    import numpy as np

    def alloc():
        import time

        a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        time.sleep(0.3)  # hold it long enough for the sampling thread on a loaded machine
        return float(a.sum())

    peak, base = common.peak_memory_mb(alloc)
    assert 48 < peak < 200 and base > 0
    if common.MALLOC_FIXED:  # freed blocks go back to the OS: a second call shows its own peak
        again, _ = common.peak_memory_mb(alloc)
        assert 48 < again < 200


def test_interleaved_and_ratios():
    calls = []
    times = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3,
                               warmup=1)
    assert len(times["a"]) == len(times["b"]) == 3 and len(calls) == 8
    assert calls[2:4] == ["a", "b"] and calls[4:6] == ["b", "a"]  # order rotates
    r, per_round = common.ratio_stats({"x": [2.0, 2.0, 2.0], "y": [1.0, 1.0, 1.0]}, "x", "y")
    assert r == per_round == 2.0
    assert common.dice([1, 1, 0], [1, 0, 0]) == pytest.approx(2 / 3)
    assert common.dice([0], [0]) == 1.0


def test_precision_study_rows(tmp_path):
    from femurseg.core.precision import native_bf16_cpu

    if not native_bf16_cpu():  # oneDNN has no bfloat16 weight reorder for 3D convolutions without AVX-512/AVX-NE
        pytest.skip("the bfloat16 precision study needs a CPU with native bfloat16 (AVX512-BF16/AMX)")
    import bench_precision

    rows = bench_precision.run("tiny", log=quiet)["rows"]
    labels = [r["bf16_convolutions"] for r in rows]
    assert labels[0] == "all" and labels[-1] == "none (float32)" and len(labels) == 6
    ref = rows[-1]
    assert ref["bf16_flop_share"] == 0 and ref["dice_grid"] == 1.0 and ref["dice_whole_path"] == 1.0
    assert rows[0]["bf16_flop_share"] == pytest.approx(1.0)
    mixed = next(r for r in rows if "(mixed)" in r["bf16_convolutions"])
    assert 0.0 < mixed["bf16_flop_share"] < 1.0
    assert all(0.9 <= r["dice_whole_path"] <= 1.0 for r in rows)
    common.write_csv(rows, tmp_path / "precision_paper.csv")
    summary = run_all.write_summary(tmp_path).read_text()
    assert "Which convolutions may run in bfloat16" in summary


def test_machine_class_rows_and_table(results):
    """bench_classes turns one class's training and inference rows into the per-class table."""
    import bench_classes

    res = {"native_bf16": False, "training": common.read_csv(results / "training_demo.csv"),
           "inference": common.read_csv(results / "inference_paper.csv")}
    rows = bench_classes.rows_for("AVX2", res)
    assert {r["engine"] for r in rows} == {"femurseg", "femurseg-preset", "plain", "monai"}
    assert all(r["class"] == "AVX2" and r["onednn_max_cpu_isa"] == "AVX2" and r["seconds_median"] > 0 for r in rows)
    table = bench_classes.table(rows)
    assert len(table) == 4 and table[2].startswith("| AVX2 only |") and "femurseg-preset" in table[2]
    common.write_csv(rows, results / "classes.csv")
    assert "Per machine class" in run_all.write_summary(results).read_text()



def test_shift_benchmark_cohorts_summary_and_table():
    import bench_shift

    from femurseg.data.phantom import SHIFTS

    full = bench_shift.test_cohorts()
    assert list(full)[:2] == ["narrow", "wide"] and full["all shifts"] == ("narrow", "all")
    assert {f"shift {g}" for g in SHIFTS} <= set(full)
    assert set(bench_shift.test_cohorts(quick=True)) == {"narrow", "wide", "all shifts"}
    cases = [{"config": c, "cohort": co, "case": f"hip_{i}", "dsc": d + 0.01 * i, "precision": 0.9, "recall": 0.9,
              "asd_mm": 1.0, "hd95_mm": 4.0, "vol_rel_err_pct": 2.0, "qc": "ok" if i else "warn"}
             for c, d in (("wide + light aug", 0.95), ("narrow + flip", 0.90)) for co in ("narrow", "all shifts")
             for i in range(3)]
    summary = bench_shift.summarise(cases, {"wide + light aug": 30.0, "narrow + flip": 20.0})
    assert [r["config"] for r in summary] == ["narrow + flip"] * 2 + ["wide + light aug"] * 2  # CONFIGS order
    row = next(r for r in summary if r["config"] == "wide + light aug" and r["cohort"] == "narrow")
    assert row["n"] == 3 and abs(row["dsc_mean"] - 0.96) < 1e-9 and abs(row["qc_not_ok"] - 1 / 3) < 1e-9
    table = bench_shift.markdown(summary)
    assert table.splitlines()[0].startswith("| test cohort | narrow + flip: DSC")
    assert "| all shifts | 0.910 ± 0.010 / 4.0 | 0.960 ± 0.010 / 4.0 |" in table
    # a run of one configuration keeps the stored rows of the others (read back as text)
    import tempfile
    from pathlib import Path

    from common import write_csv

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shift_summary.csv"
        write_csv(summary, path)
        again = bench_shift.summarise([dict(r, dsc=0.5) for r in cases if r["config"] == "wide + light aug"],
                                      {"wide + light aug": 31.0})
        merged = bench_shift.keep_stored(path, again, ["wide + light aug"])
        assert [r["config"] for r in merged] == ["narrow + flip"] * 2 + ["wide + light aug"] * 2
        assert "| all shifts | 0.910 ± 0.010 / 4.0 | 0.500 ± 0.000 / 4.0 |" in bench_shift.markdown(merged)
    aug = bench_shift.augmentation(*bench_shift.CONFIGS["wide + light + histogram aug"][1:])
    assert aug["histogram_p"] == 0.3 and aug["rotate_deg"] == 10.0  # the light preset, one field changed


def test_ingredient_bench_scores_a_finished_run_with_and_without_tta(tmp_path, run3d):
    """The ingredient bench reuses a finished run and scores its folds with and without flip TTA."""
    import json
    import shutil

    import bench_ingredients
    import numpy as np

    from femurseg.core.io import make_volume, write_volume

    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    (data / "dataset.json").write_text("{}")
    rng = np.random.default_rng(0)
    ids = [f"hip_{i:04d}" for i in range(4)]
    for cid in ids:
        lab = np.zeros((8, 16, 16), np.float32)
        lab[2:6, 4:12, 3:9] = 1
        write_volume(data / "imagesTr" / f"{cid}_0000.nii.gz", make_volume(lab + 0.2 * rng.standard_normal(lab.shape).astype(np.float32), (1.5, 1.0, 1.0)))
        write_volume(data / "labelsTr" / f"{cid}.nii.gz", make_volume(lab, (1.5, 1.0, 1.0)), dtype=np.uint8)
    run = tmp_path / "work" / "demo"
    shutil.copytree(run3d, run)
    (run / "split.json").write_text(json.dumps({"folds": [ids[:2], ids[2:]]}))
    (run / "summary.json").write_text(json.dumps({"mean_dsc": 0.5, "sd_dsc": 0.1, "mean_precision": 0.5, "mean_recall": 0.5,
                                                  "mean_asd_mm": 1.0, "seconds_total": 1.0}))
    (run / "metrics.csv").write_text("case,dsc,precision,recall,asd_mm\n" + "".join(f"{c},0.5,0.5,0.5,1.0\n" for c in ids))
    assert bench_ingredients.run_config("demo", data, tmp_path / "work") == run  # reused, not retrained
    s, rows = bench_ingredients.score(run, data, "demo")
    assert [r["case"] for r in rows] == ids and [r["fold"] for r in rows] == [0, 0, 1, 1]
    for r in rows:
        assert 0 <= r["dsc_tta_none"] <= 1 and 0 <= r["dsc_tta_flip"] <= 1 and r["dsc"] == 0.5
    assert s["cases"] == 4 and s["threshold"] == 0.49
    assert s["dsc_check"] == np.mean([r["dsc_tta_none"] for r in rows])


def test_spacing_bench_resamples_over_the_same_field_of_view(tmp_path):
    import bench_spacing
    import numpy as np

    from femurseg.core.io import make_volume, read_image, write_volume

    lab = np.zeros((8, 20, 24), np.float32)  # canonical (A, I, L): 8 coronal slices of 1.5 mm
    lab[2:6, 5:15, 6:18] = 1
    write_volume(tmp_path / "lab.nii.gz", make_volume(lab, (1.5, 1.0, 1.0)), dtype=np.uint8)
    for pixel, slices, shape in ((2.0, 1.0, (8, 10, 12)), (1.0, "iso", (12, 20, 24)), (1.0, 2.0, (4, 20, 24))):
        bench_spacing.resample(tmp_path / "lab.nii.gz", tmp_path / "out.nii.gz", pixel, slices, label=True)
        out = read_image(tmp_path / "out.nii.gz")
        assert out.data.shape == shape
        extent = np.asarray(out.data.shape) * np.asarray(out.spacing)
        assert np.allclose(extent, (12.0, 20.0, 24.0))
        vol_mm3 = out.data.sum() * np.prod(out.spacing)
        assert abs(vol_mm3 - lab.sum() * 1.5) / (lab.sum() * 1.5) < 0.2


def test_fov_bench_pads_in_plane_and_keeps_the_anatomy_in_place(tmp_path):
    import bench_fov
    import numpy as np

    from femurseg.core.io import make_volume, read_image, write_volume

    img = np.full((8, 20, 24), 5.0, np.float32)  # canonical (A, I, L)
    img[2:6, 5:15, 6:18] = 100.0
    write_volume(tmp_path / "img.nii.gz", make_volume(img, (1.5, 1.0, 1.0)))
    bench_fov.pad_inplane(tmp_path / "img.nii.gz", tmp_path / "out.nii.gz", label=False)
    src, out = read_image(tmp_path / "img.nii.gz"), read_image(tmp_path / "out.nii.gz")
    p = bench_fov.PAD
    assert out.data.shape == (8, 20 + 2 * p, 24 + 2 * p)
    np.testing.assert_array_equal(out.data[:, p:-p, p:-p], img)
    assert np.all(out.data[:, :p] == 5.0)  # background: the 1st percentile
    # the original voxels keep their world position
    np.testing.assert_allclose(out.affine @ [0, p, p, 1], src.affine @ [0, 0, 0, 1], atol=1e-4)


def test_fov_bench_cuts_an_off_centre_slab_in_place(tmp_path):
    import bench_fov
    import numpy as np

    from femurseg.core.io import make_volume, read_image, write_volume

    img = np.arange(128, dtype=np.float32)[:, None, None] * np.ones((128, 6, 5), np.float32)  # value = slice
    write_volume(tmp_path / "img.nii.gz", make_volume(img, (1.5, 1.0, 1.0)))
    src = read_image(tmp_path / "img.nii.gz")
    firsts = set()
    for index in (0, 1):
        bench_fov.off_centre_slab(tmp_path / "img.nii.gz", tmp_path / "out.nii.gz", index)
        out = read_image(tmp_path / "out.nii.gz")
        assert out.data.shape == (96, 6, 5)
        first = int(out.data[0, 0, 0])
        np.testing.assert_array_equal(out.data[:, 0, 0], np.arange(first, first + 96))  # contiguous slices
        np.testing.assert_allclose(out.affine @ [0, 0, 0, 1], src.affine @ [first, 0, 0, 1], atol=1e-4)  # in place
        firsts.add(first)
    assert firsts == {16 - bench_fov.OFF_CENTRE, 16 + bench_fov.OFF_CENTRE}  # one way, then the other
