"""femurseg.evaluation.compare and femurseg.evaluation.report: tables, statistics, figures, meshes, self-contained report.html.

The runs are built directly as files in the run layout (config.json, split.json, oof/ probability
maps, thresholds.json) from synthetic masks; nothing is trained.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from helpers import ball
from scipy.ndimage import gaussian_filter

from femurseg.core import io
from femurseg.data.dataset import MR_LABELS, write_dataset
from femurseg.evaluation import stats
from femurseg.evaluation.compare import RunSpec, run_compare
from femurseg.evaluation.evaluate import read_csv
from femurseg.evaluation.report import surface
from femurseg.evaluation.report.html import referenced_files

SHAPE, SPACING = (10, 40, 36), (1.5, 0.7, 0.7)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _femur(rng: np.random.Generator) -> np.ndarray:
    head = ball(SHAPE, centre=(4.5, 13, 14), radius=5.5 + rng.normal(0, 0.3), spacing=SPACING)
    g = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    shaft = ((g[0] - 4.5) ** 2 * 2.25 + (g[2] - 22) ** 2 * 0.49 <= 10) & (g[1] >= 14) & (g[1] <= 34)
    neck = (np.abs(g[0] - 4.5) <= 2) & (np.abs(g[1] - 14) <= 4) & (g[2] >= 14) & (g[2] <= 22)
    return (head | shaft | neck).astype(np.uint8)


def build_fake_runs(root: Path, n: int = 6, models=(("unet2d", 0.22, 1.4), ("unet3d", 0.06, 0.8)),
                    seed: int = 0) -> tuple[Path, list[Path]]:
    """A dataset and one fake cv run per ``(model name, noise, blur)``; returns (dataset, runs)."""
    rng = np.random.default_rng(seed)
    vols, refs = [], {}
    for i in range(n):
        cid = f"hip_{i:04d}"
        lab = _femur(rng)
        img = io.make_volume((lab * 300.0 + rng.normal(100, 30, SHAPE)).astype(np.float32), SPACING)
        vols.append((cid, img, img.with_data(lab)))
        refs[cid] = (img, lab)
    ds = write_dataset(root / "ds", vols, MR_LABELS).root
    ids = sorted(refs)
    runs = []
    for mi, (name, noise, blur) in enumerate(models):
        run = root / f"run_{name}"
        (run / "oof").mkdir(parents=True)
        cfg = {"format": "femurseg-run", "version": 1, "kind": "cv", "dataset": str(ds.resolve()), "modality": "MR",
               "labels": MR_LABELS, "model": {"name": name, "features": 8, "levels": 3, "dilations": None}, "k": 2}
        (run / "config.json").write_text(json.dumps(cfg))
        (run / "split.json").write_text(json.dumps({"version": 1, "k": 2, "folds": [ids[::2], ids[1::2]]}))
        (run / "thresholds.json").write_text(json.dumps({"pr": 0.5, "youden": 0.4}))
        (run / "summary.json").write_text(json.dumps({"timings": {"inference_s_per_case": 1.5 + mi}}))
        for cid, (img, lab) in refs.items():
            p = gaussian_filter(lab.astype(np.float32), [0.4, blur, blur]) + rng.normal(0, noise, SHAPE)
            io.write_like(run / "oof" / f"{cid}.nii.gz", np.clip(p, 0, 1).astype(np.float32), img)
        runs.append(run)
    return ds, runs


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    ds, runs = build_fake_runs(root)
    notes: list[str] = []
    hl = run_compare(runs, root / "report", names=["2D", "3D"], progress=False, notify=notes.append)
    return root, runs, hl, notes


def test_tables_match_per_case_values(compared):
    root, runs, hl, _ = compared
    rep = root / "report"
    per_case = read_csv(rep / "per_case.csv")
    table = {r["model"]: r for r in read_csv(rep / "table_metrics.csv")}
    assert set(table) == {"2D", "3D"}
    for name in ("2D", "3D"):
        dsc = np.array([r["dsc"] for r in per_case if r["model"] == name])
        assert len(dsc) == 6
        assert table[name]["dsc_mean"] == pytest.approx(dsc.mean(), rel=1e-4)
        assert table[name]["dsc_sd"] == pytest.approx(dsc.std(ddof=1), rel=1e-3)
        ap = np.array([r["ap"] for r in per_case if r["model"] == name])
        assert table[name]["ap_median"] == pytest.approx(np.median(ap), rel=1e-4)
        assert table[name]["seconds_per_case"] == pytest.approx(1.5 if name == "2D" else 2.5)
    assert table["3D"]["dsc_mean"] > table["2D"]["dsc_mean"]
    # headline numbers (what `femurseg demo` prints) are the first model's
    assert hl["model"] == "2D" and hl["mean_dsc"] == pytest.approx(table["2D"]["dsc_mean"], rel=1e-4)
    assert hl["seconds_per_case"] == pytest.approx(1.5) and hl["models"]["3D"]["mean_asd_mm"] > 0


def test_significance_is_wilcoxon_holm_of_ap(compared):
    root, _, _, _ = compared
    per_case = read_csv(root / "report" / "per_case.csv")
    table = {m: [r["ap"] for r in per_case if r["model"] == m] for m in ("2D", "3D")}
    want = stats.wilcoxon_holm(table)[0]
    pairs = read_csv(root / "report" / "table_significance_pairs.csv")
    assert pairs[0]["p_holm"] == pytest.approx(want["p_holm"], rel=1e-4)
    matrix = read_csv(root / "report" / "table_significance.csv")
    assert matrix[0]["model"] == "2D" and matrix[0]["3D"] == want["stars"] != "ns"


def test_volume_table_and_figures_exist(compared):
    root, _, _, _ = compared
    rep = root / "report"
    vols = read_csv(rep / "table_volumes.csv")
    assert {v["model"] for v in vols} == {"2D", "3D"} and all(v["mae_cm3"] >= 0 for v in vols)
    for f in ("roc_pr.png", "boxplots.png", "volume_agreement.png", "bland_altman.png"):
        assert (rep / f).stat().st_size > 10_000, f
    panels = sorted(rep.glob("case_*.png"))
    assert 1 <= len(panels) <= 3  # best, median and worst DSC of the first model (may coincide)


def test_meshes_are_coloured_by_distance(compared):
    root, _, _, _ = compared
    plys = sorted((root / "report" / "meshes").glob("*.ply"))
    assert plys and len(plys) == len(list((root / "report" / "meshes").glob("*.vtk")))
    header = plys[0].read_text().split("end_header")[0]
    assert "property uchar red" in header and "property float distance" in header
    mesh = surface.read_ply(plys[0])
    assert len(mesh.faces) > 100 and np.isfinite(mesh.distance).all()
    assert np.median(np.abs(mesh.distance)) < 3.0
    vtk = plys[0].with_suffix(".vtk").read_text()
    assert "POLYDATA" in vtk and "SCALARS distance_mm float" in vtk


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs).get("src"))


def test_report_html_references_exist(compared):
    root, _, hl, _ = compared
    report = Path(hl["report"])
    assert report == root / "report" / "report.html"
    text = report.read_text()
    assert "<style>" in text and "<link rel=\"stylesheet\"" not in text and "<script" not in text
    p = _Refs()
    p.feed(text)
    assert len(p.imgs) >= 5
    for src in p.imgs:
        assert src, "an <img> without src"
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    refs = referenced_files(text)
    assert any(r.endswith(".ply") for r in refs) and any(r.endswith(".csv") for r in refs)
    for ref in refs:
        assert not Path(ref).is_absolute() and ".." not in Path(ref).parts, ref
        assert (report.parent / ref).is_file(), ref
    for name in ("Table 4", "Fig. 2", "Fig. 3", "Fig. 8"):
        assert name in text


def test_differing_case_sets_warn_and_intersect(compared, tmp_path):
    root, runs, _, _ = compared
    partial = tmp_path / "partial"
    shutil.copytree(runs[1], partial)
    (partial / "oof" / "hip_0005.nii.gz").unlink()
    notes: list[str] = []
    hl = run_compare([runs[0], RunSpec(partial, name="3D partial")], tmp_path / "rep", panels=False,
                     progress=False, notify=notes.append)
    assert hl["cases"] == [f"hip_{i:04d}" for i in range(5)]
    assert any("different case sets" in n for n in notes)


def test_single_run_report_with_chosen_case(compared, tmp_path):
    root, runs, _, _ = compared
    hl = run_compare([runs[1]], tmp_path / "one", cases=["hip_0002"], progress=False)
    assert hl["model"] == "3D U-Net F8 L3" and 0.8 < hl["mean_dsc"] <= 1
    assert (tmp_path / "one" / "case_hip_0002.png").exists()
    assert not (tmp_path / "one" / "table_significance.csv").exists()
    text = (tmp_path / "one" / "report.html").read_text()
    assert all((tmp_path / "one" / r).is_file() for r in referenced_files(text))


def test_signed_surface_distance():
    sp = (1.0, 0.5, 0.5)
    shape = (24, 48, 48)
    ref = ball(shape, radius=8.0, spacing=sp)
    big = ball(shape, radius=9.0, spacing=sp)
    small = ball(shape, radius=7.0, spacing=sp)
    d_big = surface.coloured_surface(big, ref, sp).distance
    d_small = surface.coloured_surface(small, ref, sp).distance
    assert np.median(d_big) == pytest.approx(1.0, abs=0.3)
    assert np.median(d_small) == pytest.approx(-1.0, abs=0.3)
    empty = surface.coloured_surface(np.zeros(shape, bool), ref, sp)
    assert empty.empty


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make browser installs Debian's chromium)")
def test_report_renders_in_headless_chromium(compared, tmp_path):
    """The report opened from disk in a real browser: a non-blank screenshot, every image decoded
    (none broken), its tables present, and nothing fetched from another machine (every host name
    resolves to nothing, so an external reference would show as a broken image or a failed load)."""
    root, _, hl, _ = compared
    report = Path(hl["report"]).resolve()
    shot = tmp_path / "shot.png"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost", f"--user-data-dir={tmp_path / 'profile'}"]
    r = subprocess.run(base + ["--window-size=1280,2400", f"--screenshot={shot}", report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 20_000
    from PIL import Image

    im = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert im.shape[0] >= 2000 and im.std() > 10  # not a blank page
    # a copy of the report (same folder, so relative links resolve) that records, after load, how
    # many images decoded and how many resources came from outside the machine
    probe = report.with_name("report_probe.html")
    script = ("<script>window.addEventListener('load', () => {"
              "const imgs = [...document.images];"
              "const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;"
              "const remote = performance.getEntriesByType('resource').map(e => e.name)"
              ".filter(u => !u.startsWith('file:') && !u.startsWith('data:')).length;"
              "document.body.setAttribute('data-probe', `images=${imgs.length} broken=${broken} remote=${remote} "
              "tables=${document.querySelectorAll('table').length}`);});</script>")
    probe.write_text(report.read_text().replace("</body>", script + "</body>"))
    try:
        r = subprocess.run(base + ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                           capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'data-probe="images=(\d+) broken=(\d+) remote=(\d+) tables=(\d+)"', r.stdout)
    assert m, r.stdout[-2000:]
    images, broken, remote, tables = map(int, m.groups())
    assert images >= 4 and broken == 0 and remote == 0 and tables >= 2


def test_report_quality_control_of_out_of_fold_masks(compared, tmp_path):
    """The report checks each out-of-fold mask as `femurseg predict` checks a scan: an empty mask
    fails, a mask with a second large blob warns, the others are ok; the verdicts are in
    table_qc.csv, per_case.csv, the headline and report.html."""
    from femurseg.data.dataset import load_dataset
    from femurseg.inference.qc import image_features, mask_features, reference_from_cases, write_reference

    root, runs, _, _ = compared
    run = tmp_path / "run_qc"
    shutil.copytree(runs[1], run)
    ds = load_dataset(json.loads((run / "config.json").read_text())["dataset"])
    feats = {}
    for c in ds.cases:
        img, lab = io.read_image(c.image), io.read_image(c.label)
        feats[c.case_id] = (image_features(img.data, img.spacing), mask_features(lab.data > 0, img.spacing))
    write_reference(run, reference_from_cases(feats))
    like = io.read_image(ds.case("hip_0001").image)
    io.write_like(run / "oof" / "hip_0001.nii.gz", np.zeros(SHAPE, np.float32), like)
    blob = io.read_image(run / "oof" / "hip_0003.nii.gz").data.copy()
    blob[:, 0:6, 29:36] = 1.0
    io.write_like(run / "oof" / "hip_0003.nii.gz", blob.astype(np.float32), like)

    hl = run_compare([RunSpec(run, name="3D")], tmp_path / "rep", panels=False, progress=False)
    rows = {r["case"]: r for r in read_csv(tmp_path / "rep" / "table_qc.csv")}
    assert set(rows) == {f"hip_{i:04d}" for i in range(6)}
    assert rows["hip_0001"]["qc"] == "fail" and "empty mask" in rows["hip_0001"]["qc_reasons"]
    assert rows["hip_0003"]["qc"] == "warn" and "large components" in rows["hip_0003"]["qc_reasons"]
    assert all(rows[c]["qc"] == "ok" for c in ("hip_0000", "hip_0002", "hip_0004", "hip_0005")), rows
    assert all(r["reference"] == "yes" for r in rows.values())
    assert hl["qc"] == {"ok": 4, "warn": 1, "fail": 1}
    per_case = {r["case"]: r for r in read_csv(tmp_path / "rep" / "per_case.csv")}
    assert per_case["hip_0001"]["qc"] == "fail" and per_case["hip_0000"]["qc"] == "ok"
    text = (tmp_path / "rep" / "report.html").read_text()
    assert "Quality control of the out-of-fold masks" in text and "empty mask" in text

    # the check can be switched off (no table, no section)
    hl2 = run_compare([RunSpec(run, name="3D")], tmp_path / "rep2", panels=False, qc=False, progress=False)
    assert "qc" not in hl2 and not (tmp_path / "rep2" / "table_qc.csv").exists()
