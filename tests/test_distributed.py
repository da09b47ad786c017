"""Distributed back-ends (femurseg.scale.distributed): Ray folds and cohorts, faults, resume, DDP under torchrun.

The DDP test (torchrun, 2 gloo processes) needs no Ray and always runs. Ray tests share one local
Ray instance (``ray.init(num_cpus=2)``, about 10-15 s to start on 2 cores) and skip cleanly when
Ray (the ``distributed`` extra) is not installed. Training uses one torch
thread everywhere (``threads: 1`` in the run; Ray tasks with ``num_cpus=1``), so the local and the
Ray back-ends must give bit-identical weights and out-of-fold probabilities.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from femurseg.core import io
from femurseg.core.errors import FemursegError
from femurseg.inference import predict as P
from femurseg.scale.distributed import (
    RayBackend,
    backend_from_options,
    resolve_backend,
    run_jobs,
    shard_batches,
)

TINY_MODEL = {"name": "unet3d", "features": 4, "levels": 2, "dilations": None}
TINY_PREP = {"crop_slices": None, "target_size": None, "scale": None}
CV_KW = dict(model_cfg=TINY_MODEL, prep_cfg=TINY_PREP, aug_cfg={"flip_p": 0.5},
             train_cfg={"max_epochs": 3, "min_epochs": 3, "threads": 1}, folds=2, seed=0, progress=False)
SHAPE = (8, 32, 32)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from femurseg.data.synth import synthesize

    path = tmp_path_factory.mktemp("dist") / "ds"
    synthesize(path, n=4, shape=SHAPE, progress=False)
    return path


@pytest.fixture(scope="module")
def local_run(dataset) -> Path:
    """The reference: 2-fold CV on the local back-end."""
    from femurseg.training.cv import run_cv

    out = dataset.parent / "run_local"
    prev = torch.get_num_threads()
    try:
        run_cv(dataset, out, **CV_KW)
    finally:
        torch.set_num_threads(prev)
    return out


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module (this module's classes are pickled by value for the workers)."""
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cohort(dataset) -> Path:
    """6 tiny phantom scans, ``c3.nii.gz`` truncated (corrupt)."""
    from femurseg.data.synth import synthesize

    ds = synthesize(dataset.parent / "ds_cohort", n=6, shape=SHAPE, seed=7, progress=False)
    folder = dataset.parent / "cohort"
    folder.mkdir()
    for i, case in enumerate(ds.cases):
        data = case.image.read_bytes()
        (folder / f"c{i}.nii.gz").write_bytes(data[: len(data) // 2] if i == 3 else data)
    return folder


class KillOnce:
    """A task hook (RayBackend.on_task_start) that kills its worker process once (marker file): at the start
    of the task, or -- ``after`` a file appears in the task's folder -- from a watcher thread mid-task."""

    def __init__(self, marker: Path, kind: str, key: str, after: str | None = None) -> None:
        self.marker, self.kind, self.key, self.after = Path(marker), kind, key, after

    def __call__(self, kind: str, key: str, path: Path) -> None:
        if kind != self.kind or key != self.key or self.marker.exists():
            return
        if self.after is None:
            self.marker.write_text(json.dumps({"pid": os.getpid()}))
            os._exit(1)
        watch = Path(path) / self.after

        def watcher() -> None:
            while not watch.exists():
                time.sleep(0.002)
            log = (Path(path) / "log.csv").read_text().splitlines()
            self.marker.write_text(json.dumps({"pid": os.getpid(), "log_row_1": log[1]}))
            os._exit(1)

        threading.Thread(target=watcher, daemon=True).start()


def _assert_same_run(a: Path, b: Path) -> None:
    """Same fold weights (best and last) and same out-of-fold probabilities, bit for bit."""
    for k in (0, 1):
        for name in ("best.pt", "last.pt"):
            wa = torch.load(a / f"fold_{k}" / name, weights_only=True)
            wb = torch.load(b / f"fold_{k}" / name, weights_only=True)
            assert wa["epoch"] == wb["epoch"]
            for p in wa["model"]:
                assert torch.equal(wa["model"][p], wb["model"][p]), (k, name, p)
    cases = sorted(p.name for p in (a / "oof").iterdir())
    assert cases == sorted(p.name for p in (b / "oof").iterdir()) and len(cases) == 4
    for c in cases:
        assert np.array_equal(io.read_image(a / "oof" / c).data, io.read_image(b / "oof" / c).data), c
    assert json.loads((a / "thresholds.json").read_text()) == json.loads((b / "thresholds.json").read_text())


# ----------------------------------------------------------------------------- no Ray needed


@pytest.mark.parametrize("n,batch,world", [(8, 2, 2), (7, 1, 2), (5, 2, 3), (1, 1, 2), (12, 3, 4)])
def test_shard_batches_disjoint_and_like_one_process(n, batch, world):
    items = list(range(n))
    shards = [shard_batches(items, batch, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    flat = [i for s in shards for b in s for i in b]
    padded = -(-n // world) * world
    assert sorted(flat) == sorted(items + items[: padded - n])  # disjoint, all covered (padding repeats)
    if n % (batch * world) == 0:  # step j of the ranks together = batch j of one process with batch B*W
        for j in range(len(shards[0])):
            assert sorted(i for s in shards for i in s[j]) == items[j * batch * world:(j + 1) * batch * world]


def test_backend_options():
    assert resolve_backend("local") is None and resolve_backend(None) is None
    with pytest.raises(FemursegError, match="--backend"):
        resolve_backend("dask")
    with pytest.raises(FemursegError, match="only with --backend ray"):
        backend_from_options("local", address="head:6379")
    with pytest.raises(FemursegError, match="--num-cpus"):
        RayBackend(num_cpus=0)
    assert backend_from_options("local") == "local"


def test_local_backend_needs_no_ray(tmp_path):
    """With Ray not importable: the local back-end works (grid jobs, resume) and --backend ray is one line."""
    code = """
import sys
sys.modules["ray"] = None  # import ray -> ImportError
from femurseg.scale.distributed import resolve_backend, run_jobs, ray_available
from femurseg.core.errors import FemursegError
assert not ray_available() and resolve_backend("local") is None
assert run_jobs([lambda: 1, lambda: 2], "local") == [1, 2]
try:
    resolve_backend("ray")
except FemursegError as exc:
    print("ERR", exc)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ERR --backend ray: Ray is not installed; pip install 'femurseg[distributed]'" in r.stdout


def test_local_resume_skips_complete_outputs(local_run, cohort, tmp_path):
    """Local batch mode: --resume skips complete outputs, redoes damaged ones, never rewrites finished ones."""
    pred = P.load_predictor(local_run, device="cpu")
    scans = sorted(cohort.iterdir())
    good = [s for s in scans if s.name != "c3.nii.gz"]
    out = tmp_path / "masks"
    first = P.predict_many(pred, good[:3], out, progress=False, notify=lambda m: None)
    assert len(first.results) == 3
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "c1.nii.gz").write_bytes((out / "c1.nii.gz").read_bytes()[:100])  # damaged after the fact
    res = P.predict_many(pred, scans, out, progress=False, resume=True, notify=lambda m: None)
    assert res.summary() == "segmented 3 of 6 scans, 1 failed, 2 already done (skipped)"
    assert [s.name for s in res.skipped] == ["c0.nii.gz", "c2.nii.gz"]
    assert {r.input.name for r in res.results} == {"c1.nii.gz", "c4.nii.gz", "c5.nii.gz"}
    for name in ("c0.nii.gz", "c2.nii.gz"):
        assert (out / name).stat().st_mtime_ns == before[name]
    io.read_image(out / "c1.nii.gz")  # redone, whole


# ----------------------------------------------------------------------------- Ray


def test_cv_on_ray_equals_local(ray_local, dataset, local_run):
    from femurseg.training.cv import run_cv

    out = dataset.parent / "run_ray"
    res = run_cv(dataset, out, backend=RayBackend(num_cpus=1), **CV_KW)
    assert [f["fold"] for f in res.summary["folds"]] == [0, 1]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local_run.iterdir())
    _assert_same_run(local_run, out)


def test_cv_on_ray_survives_a_killed_worker(ray_local, dataset, local_run, tmp_path):
    """Fold 1's worker is killed (os._exit) after its first epoch's checkpoint; Ray retries the task,
    which resumes from last.pt (epoch 1 is not trained again) and ends with the failure-free weights."""
    from femurseg.training.cv import run_cv

    out = dataset.parent / "run_ray_killed"
    marker = tmp_path / "killed.json"
    backend = RayBackend(num_cpus=1, max_retries=2, on_task_start=KillOnce(marker, "fold", "1", after="state.json"))
    run_cv(dataset, out, backend=backend, **CV_KW)
    killed = json.loads(marker.read_text())
    assert killed["pid"] != os.getpid()
    log = (out / "fold_1" / "log.csv").read_text().splitlines()
    assert log[1] == killed["log_row_1"]  # the epoch-1 row (with its timing) survived: resumed, not restarted
    _assert_same_run(local_run, out)


def test_ray_cohort_corrupt_scan_and_killed_replica(ray_local, local_run, cohort, tmp_path):
    """6 scans (one corrupt) through 2 Ray replicas, one replica killed on its first scan c4: 5 masks
    equal to the local ones, 1 failure reported, exit status 2 (some failed)."""
    out, ref = tmp_path / "masks", tmp_path / "ref"
    marker = tmp_path / "killed.json"
    notes: list[str] = []
    lines: list[str] = []
    backend = RayBackend(replicas=2, max_retries=2, on_task_start=KillOnce(marker, "scan", "c4"))
    code = P.predict_command(local_run, [cohort], out, backend=backend, progress=False, echo=lines.append,
                             notify=notes.append)
    assert code == P.EXIT_SOME_FAILED
    assert marker.exists()
    assert lines[0] == "segmented 5 of 6 scans, 1 failed" and "predictions.csv" in lines[-1]
    failures = [n for n in notes if n.startswith("failed:")]
    assert len(failures) == 1 and "c3.nii.gz" in failures[0] and "\n" not in failures[0]
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".nii.gz")) == \
        [f"c{i}.nii.gz" for i in (0, 1, 2, 4, 5)]
    assert (out / "predictions.csv").exists() and (out / "c0_qc.json").exists()
    with torch.inference_mode():
        prev = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the replicas
        try:
            P.predict_command(local_run, [cohort], ref, progress=False, echo=lambda m: None, notify=lambda m: None)
        finally:
            torch.set_num_threads(prev)
    for i in (0, 1, 2, 4, 5):
        a, b = io.read_image(out / f"c{i}.nii.gz", dtype=None), io.read_image(ref / f"c{i}.nii.gz", dtype=None)
        assert np.array_equal(a.data, b.data) and a.geometry.matches(b.geometry) is None


def test_ray_cohort_resume_after_interruption(ray_local, local_run, cohort, tmp_path):
    """A cohort run stopped half-way (3 of 6 done, plus a killed writer's temporary file) and restarted
    with --resume on Ray: finishes the rest, leaves the finished outputs untouched."""
    out = tmp_path / "masks"
    pred = P.load_predictor(local_run, device="cpu")
    scans = sorted(cohort.iterdir())
    P.predict_many(pred, scans[:3], out, progress=False, notify=lambda m: None)  # "interrupted" after c0-c2
    (out / ".c4.partial.nii.gz").write_bytes(b"half a file")  # what a killed writer leaves
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("c*.nii.gz")}
    lines: list[str] = []
    code = P.predict_command(local_run, [cohort], out, backend=RayBackend(replicas=2), resume=True, progress=False,
                             echo=lines.append, notify=lambda m: None)
    assert code == P.EXIT_SOME_FAILED  # c3 is corrupt
    assert lines[0] == "segmented 2 of 6 scans, 1 failed, 3 already done (skipped)"
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("c*.nii.gz")}
    assert {k: after[k] for k in before} == before
    assert sorted(after) == [f"c{i}.nii.gz" for i in (0, 1, 2, 4, 5)]
    for name in after:
        io.read_image(out / name)


@pytest.mark.slow
def test_grid_jobs_on_ray(ray_local, dataset, local_run):
    """run_jobs: two run_cv jobs at once on Ray (4 fold tasks queued together), same results as local."""
    from femurseg.training.cv import run_cv

    outs = [dataset.parent / f"grid_{i}" for i in range(2)]
    kw = {**CV_KW, "train_cfg": {**CV_KW["train_cfg"], "max_epochs": 1, "min_epochs": 1}}
    res = run_jobs([lambda o=o: run_cv(dataset, o, backend=RayBackend(), **kw) for o in outs], "ray")
    assert [r.run.path for r in res] == outs
    w = [torch.load(o / "fold_1" / "last.pt", weights_only=True)["model"] for o in outs]
    assert all(torch.equal(w[0][p], w[1][p]) for p in w[0])


# ----------------------------------------------------------------------------- torchrun / DDP

DDP_ENTRY = """
import json, sys
from femurseg.scale.distributed import init_ddp
from femurseg.training.cv import run_train
a = json.loads(sys.argv[1])
run_train(a["dataset"], a["out"], dist=init_ddp(None), progress=False, **a["kw"])
"""


def test_ddp_two_cpu_ranks_equal_one_process_with_the_effective_batch(tmp_path, monkeypatch):
    """torchrun, 2 gloo ranks x batch 1 == 1 process x batch 2 (same samples per step; loss 'ce', no
    augmentation, whole volumes): same weights within float tolerance; only rank 0 wrote the run.

    Validation runs in float32 ("fused"): the default on a bfloat16 CPU ("mixed") turns the
    runs' last-bit weight differences into a different validation Dice (~1e-4), which is
    precision, not what this test is about."""
    from femurseg.training.cv import run_train

    monkeypatch.setenv("FEMURSEG_ACCEL", "fused")  # read per call, and inherited by torchrun's ranks
    from femurseg.data.synth import synthesize

    # The narrow world: on the wide world's harder cases some of the tiny net's gradients are near
    # zero, where Adam's first steps (update ~ lr * sign) turn last-bit reduction-order differences
    # between 1 x batch 2 and 2 x batch 1 into lr-sized weight differences (measured: 1e-2).
    ds = synthesize(tmp_path / "ds", n=6, shape=SHAPE, progress=False, variation="narrow")
    from femurseg.data.augment import AugmentConfig

    no_aug = AugmentConfig(flip_p=0.0).to_dict()  # every kind off (the default preset's would be on)
    kw = dict(model_cfg=TINY_MODEL, prep_cfg=TINY_PREP, aug_cfg=no_aug, val_fraction=0.34, seed=0)
    train = {"loss": "ce", "max_epochs": 3, "min_epochs": 3, "threads": 1}
    entry = tmp_path / "entry.py"
    entry.write_text(DDP_ENTRY)
    args = json.dumps({"dataset": str(ds.root), "out": str(tmp_path / "ddp"), "kw": {**kw, "train_cfg": {**train, "batch_size": 1}}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        str(entry), args], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-8000:]
    prev = torch.get_num_threads()
    try:
        run_train(ds.root, tmp_path / "single", progress=False, train_cfg={**train, "batch_size": 2}, **kw)
    finally:
        torch.set_num_threads(prev)
    cfg = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert cfg["ddp"] == {"world_size": 2, "backend": "gloo", "per_rank_batch": 1, "effective_batch": 2}
    a = torch.load(tmp_path / "single" / "fold_0" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "fold_0" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    from femurseg.models import build_model
    from femurseg.training.fit import derive_seed, seed_everything

    seed_everything(derive_seed(0, 0, 0))  # the initial weights, as train_fold builds them
    init = build_model(cfg["model"]).state_dict()
    assert max(float((a["model"][p] - init[p]).abs().max()) for p in init) > 1e-3  # training moved the weights
    for p in a["model"]:
        torch.testing.assert_close(b["model"][p], a["model"][p], rtol=1e-4, atol=1e-5)
    assert [h["train_loss"] for h in b["history"]] == pytest.approx([h["train_loss"] for h in a["history"]], rel=1e-5)
    assert [h["val_dice"] for h in b["history"]] == pytest.approx([h["val_dice"] for h in a["history"]], rel=1e-5)
    # nothing but the run's own files: no stray temporaries from a second writer
    assert not [p for p in (tmp_path / "ddp").rglob(".*")]
