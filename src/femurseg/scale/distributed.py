"""Distributed back-ends: Ray for folds, grids and cohorts; torch.distributed for one big model.

Three ways to use more than one process, all calling the *same* functions as the local path:

* **Cross-validation folds and experiment grids on Ray** (``femurseg cv ... --backend ray``,
  ``femurseg experiment ... --backend ray``). :meth:`RayBackend.train_folds` submits one Ray task
  per fold; each task runs :func:`femurseg.training.cv.train_fold` (exactly what the local loop of
  :func:`femurseg.training.cv.run_cv` runs) and requests ``num_cpus`` / ``num_gpus``, so a cluster trains
  folds in parallel. A grid runs one :func:`femurseg.training.cv.run_cv` per configuration in driver
  threads (:func:`run_jobs`), so every (configuration, fold) task of the grid is queued on the
  cluster at once. The driver checks the inputs, creates the run folder, preprocesses the cases
  once (they reach the tasks through Ray's object store), then waits; the out-of-fold
  thresholds, masks and metrics are computed on the driver as in a local run. Results land in
  the same run folder layout as a local run: each task writes ``RUN/fold_<k>/`` and
  ``RUN/oof/`` itself, every file atomically (temporary name, then rename), so **the run
  folder, the dataset and the scans must be on a file system that every node sees at the same
  path** (NFS, Lustre, a cloud file system; paths are made absolute before they are sent).
* **Cohort inference on Ray** (``femurseg predict RUN -i LIST -o OUTDIR --backend ray``).
  :meth:`RayBackend.predict_many` starts ``replicas`` Ray actors, each holding the run's models
  (:func:`femurseg.inference.predict.load_predictor`), and streams the scans through them (at most two in
  flight per actor). Each scan goes through :func:`femurseg.inference.predict.predict_case` -- the local
  batch mode's per-scan function, with its error handling -- and the driver prints failures as
  they arrive and the same summary line. ``--resume`` (both back-ends,
  :func:`femurseg.inference.predict.outputs_complete`) skips scans whose outputs exist and read back.
* **One model on several GPUs** (``torchrun --nproc_per_node N ... femurseg train ... --ddp``).
  :func:`init_ddp` joins the process group that ``torchrun`` describes in the environment (NCCL
  on GPUs, gloo on CPU) and returns a :class:`DDP`, which :func:`femurseg.training.fit.fit` uses to wrap
  the network in ``DistributedDataParallel``, give each rank a disjoint shard of every epoch's
  samples (:func:`shard_batches`, like ``DistributedSampler``), average losses and validation
  over the ranks and let only rank 0 write the run folder. The effective batch is
  ``batch_size`` x world size. With whole-volume batches of equal shape, a per-voxel-mean loss
  (``ce``, or the weighted losses with per-sample class fractions, i.e. 2D slices and 3D
  patches) and no augmentation, N ranks reproduce one process with batch ``N x batch_size`` up
  to floating-point rounding (tested). Otherwise the result is statistically, not numerically,
  the same: the default whole-volume "wce" loss takes its class weights from each rank's own
  batch, each rank draws its own augmentations, and batch normalisation uses per-rank
  statistics (converted to ``SyncBatchNorm`` on GPUs).

Faults. Fold tasks are retried by Ray (``max_retries`` times when their worker dies;
``retry_exceptions`` for :data:`RETRY_EXCEPTIONS`, e.g. a shared file system hiccup); a retried
fold resumes from its last complete epoch (``last.pt``) and, because training re-seeds every
epoch from (seed, fold, epoch), finishes with the weights of an uninterrupted run (same thread
count -- each task uses ``threads`` = its ``num_cpus`` -- and machine type). Predict actors are
restarted (``max_restarts``) and their in-flight scans re-run (``max_task_retries``); outputs are
renamed into place only when complete, so a killed worker never leaves a partial file under a
final name (hidden ``.<case>.*`` temporaries of a killed writer may remain; they are harmless).
A whole cohort run that is interrupted is finished by running the same command with ``--resume``.

Ray is optional (``pip install 'femurseg[distributed]'``); it is imported only when a Ray backend
is used, and the local back-end never needs it.
"""

from __future__ import annotations

import atexit
import collections
import copy
import dataclasses
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from femurseg.core.errors import FemursegError

BACKENDS = ("local", "ray")
RETRY_EXCEPTIONS: tuple[type[BaseException], ...] = (OSError,)
"""Exceptions raised inside a fold task that Ray retries (besides a dead worker, always retried)."""
INSTALL_HINT = "pip install 'femurseg[distributed]' (or 'ray[default]>=2.9')"
IN_FLIGHT_PER_REPLICA = 2
"""Scans queued on each predict actor (one running, one waiting), so actors never idle."""

Notify = Callable[[str], None]
TaskHook = Callable[[str, str, Path], None]


def _stderr_notice(msg: str) -> None:
    print(f"femurseg: {msg}", file=sys.stderr)


def ray_available() -> bool:
    """True when Ray can be imported (the ``distributed`` extra is installed)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FemursegError(f"--backend ray: Ray is not installed; {INSTALL_HINT}") from None
    return ray


def resolve_backend(backend: Any) -> RayBackend | None:
    """``"local"``/None -> None (run here); ``"ray"`` -> a default :class:`RayBackend`; a RayBackend
    as is, connected (:meth:`RayBackend.connect`), so that a missing Ray or an unreachable cluster
    fails before anything is written. Raises FemursegError for another value."""
    if backend is None or (isinstance(backend, str) and backend.strip().lower() == "local"):
        return None
    if isinstance(backend, str) and backend.strip().lower() == "ray":
        backend = RayBackend()
    if not isinstance(backend, RayBackend):
        raise FemursegError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    backend.connect()
    return backend


_CONNECT_LOCK = threading.Lock()


@dataclass
class RayBackend:
    """Run folds / scans as Ray tasks and actors (see the module docstring).

    Attributes:
        address: Ray cluster address (``ray://head:10001``, ``head:6379`` or ``auto`` for the cluster
            started on this machine with ``ray start``). None: ``$RAY_ADDRESS`` if set, else a private
            Ray instance is started on this machine (and stopped at exit). A process that already
            called ``ray.init`` keeps its connection.
        num_cpus: CPUs each fold task / predict actor requests (also its torch thread count).
        num_gpus: GPUs each fold task / predict actor requests (fractions share a GPU).
        max_retries: Ray retries of a fold task whose worker dies (and of :data:`RETRY_EXCEPTIONS`);
            restarts of a predict actor and re-runs of its in-flight scans.
        replicas: predict actors (None: as many as the cluster's CPUs / GPUs allow, at most one per scan).
        threads: torch threads per task/actor (None: ``num_cpus``, at least 1). Training results depend
            on the thread count (floating-point reduction order): keep it fixed to reproduce a run.
        local_cpus: CPUs of a private Ray instance started here (None: all).
        on_task_start: called inside the worker as ``hook(kind, key, path)`` when a task starts:
            ``("fold", "<k>", RUN/fold_<k>)`` or ``("scan", "<case>", <mask path>)``; for monitoring
            and fault-injection tests (it must be picklable by Ray).
        notify: where driver-side notices go.
    """

    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 3
    replicas: int | None = None
    threads: int | None = None
    local_cpus: int | None = None
    on_task_start: TaskHook | None = None
    notify: Notify = _stderr_notice

    def __post_init__(self) -> None:
        if not (self.num_cpus > 0 and math.isfinite(self.num_cpus)):
            raise FemursegError(f"--num-cpus: {self.num_cpus} must be a positive number")
        if not (self.num_gpus >= 0 and math.isfinite(self.num_gpus)):
            raise FemursegError(f"--num-gpus: {self.num_gpus} must be >= 0")
        if self.max_retries < 0:
            raise FemursegError(f"--max-retries: {self.max_retries} must be >= 0")
        if self.replicas is not None and self.replicas < 1:
            raise FemursegError(f"--replicas: {self.replicas} must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise FemursegError(f"threads: {self.threads} must be >= 1")

    @property
    def task_threads(self) -> int:
        return int(self.threads) if self.threads else max(1, int(self.num_cpus))

    # ------------------------------------------------------------------------- connection

    def connect(self) -> Any:
        """Connect to (or start) Ray once per process; returns the ``ray`` module."""
        ray = _import_ray()
        with _CONNECT_LOCK:
            if ray.is_initialized():
                return ray
            addr = self.address or os.environ.get("RAY_ADDRESS") or None
            if addr:
                _check_reachable(addr)
            try:
                if addr:
                    ray.init(address=addr, log_to_driver=True)
                else:
                    ray.init(address="local", num_cpus=self.local_cpus, include_dashboard=False, log_to_driver=True)
            except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
                where = f"the Ray cluster at {addr}" if addr else "a local Ray instance"
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                hint = ("; if the cluster uses token authentication (the default of `ray start` since Ray 2.59), "
                        "set RAY_AUTH_MODE=token here and give this machine the cluster's token "
                        "(~/.ray/auth_token or RAY_AUTH_TOKEN; `ray get-auth-token` on the head prints it)"
                        if addr and os.environ.get("RAY_AUTH_MODE", "").lower() != "token" else "")
                raise FemursegError(f"--address {addr or '(none)'}: cannot connect to {where}: {first}{hint}") from None
        return ray

    def _check_resources(self, ray: Any, what: str) -> None:
        total = ray.cluster_resources()
        for key, want in (("CPU", self.num_cpus), ("GPU", self.num_gpus)):
            if want > 0 and float(total.get(key, 0.0)) < want:
                self.notify(f"warning: each {what} requests {want:g} {key}(s) but the Ray cluster has "
                            f"{float(total.get(key, 0.0)):g}; the tasks wait until such a node joins")

    # ------------------------------------------------------------------------- folds

    def train_folds(self, run: Any, ds: Any, prepared: dict[str, Any], folds: Sequence[int], *,
                    device: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
        """Train ``folds`` of ``run`` as Ray tasks running :func:`femurseg.training.cv.train_fold`; returns their
        summary rows in fold order. Every fold is waited for; then the first failure is raised."""
        from femurseg.core.progress import progress as progress_bar
        ray = self.connect()
        self._check_resources(ray, "fold task")
        task = ray.remote(_fold_task)
        prepared_ref = ray.put(prepared)
        ds_abs = _absolute_dataset(ds)
        run_dir = str(Path(run.path).resolve())
        refs = {}
        for k in folds:
            opts = dict(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.max_retries,
                        retry_exceptions=list(RETRY_EXCEPTIONS), name=f"femurseg:{Path(run_dir).name}:fold_{k}")
            refs[task.options(**opts).remote(run_dir, ds_abs, prepared_ref, int(k), device, self.task_threads,
                                             self.on_task_start)] = int(k)
        results: dict[int, dict[str, Any]] = {}
        errors: list[tuple[int, BaseException]] = []
        pending = list(refs)
        with progress_bar(total=len(refs), desc=f"folds on Ray ({Path(run_dir).name})", unit="fold", disable=not progress,
                          file=sys.stderr) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                k = refs[done[0]]
                try:
                    results[k] = ray.get(done[0])
                except Exception as exc:  # noqa: BLE001 - raised after every fold has ended
                    errors.append((k, exc))
                bar.update()
        if errors:
            k, exc = errors[0]
            raise _task_failure(ray, exc, f"{run_dir}: fold {k}", self.max_retries,
                                "the finished folds are kept; run again with --resume") from None
        return [results[int(k)] for k in folds]

    # ------------------------------------------------------------------------- scans

    def predict_many(self, pred: Any, scans: Sequence[Path], out_dir: str | os.PathLike, *, load: dict[str, Any],
                     prob_dir: str | os.PathLike | None = None, dicom_seg: bool = False, preview: bool = False,
                     progress: bool = True, resume: bool = False, notify: Notify = _stderr_notice,
                     **options: Any) -> Any:
        """Batch prediction with Ray actors; same outputs, per-scan errors, resume and result
        (:class:`femurseg.inference.predict.BatchResult`) as :func:`femurseg.inference.predict.predict_many`.

        ``pred``: the driver's loaded predictor (its run folder and ``tiles`` are used); ``load``: the
        keyword arguments of :func:`femurseg.inference.predict.load_predictor` each actor loads the run with;
        ``options``: those of :func:`femurseg.inference.predict.predict_file` (threshold, postprocess, ...).
        """
        from femurseg.core.progress import progress as progress_bar
        from femurseg.inference import predict as P

        plan = [(Path(s).resolve(), _absolute_outputs(o))
                for s, o in P.batch_plan(scans, out_dir, prob_dir=prob_dir, dicom_seg=dicom_seg, preview=preview)]
        skipped = [s for s, o in plan if resume and P.outputs_complete(o)]
        todo = [(s, o) for s, o in plan if not (resume and P.outputs_complete(o))]
        done: dict[Path, Any] = {}
        failed: dict[Path, str] = {}
        if todo:
            ray = self.connect()
            self._check_resources(ray, "predict replica")
            n = min(len(todo), self.replicas or self._default_replicas(ray))
            replica = ray.remote(_Replica).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                                   max_restarts=self.max_retries, max_task_retries=self.max_retries)
            load = {**load, "onnx_path": None if load.get("onnx_path") is None else str(Path(load["onnx_path"]).resolve())}
            actors = [replica.remote(str(Path(pred.run_dir).resolve()), load, int(getattr(pred, "tiles", P.DEFAULT_TILES)),
                                     int(getattr(pred, "max_voxels", P.MAX_WHOLE_VOXELS)), self.task_threads,
                                     self.on_task_start) for _ in range(n)]
            queue = collections.deque(todo)
            inflight: dict[Any, tuple[Path, Any]] = {}
            dead: set[int] = set()
            bar = progress_bar(total=len(todo), desc=f"predict on Ray ({n} replica{'s' if n > 1 else ''})", unit="scan",
                               disable=not progress, file=sys.stderr)

            def refill(last_error: str = "") -> None:
                """Keep IN_FLIGHT_PER_REPLICA scans queued on every live replica."""
                busy = collections.Counter(id(a) for _, a in inflight.values())
                live = [a for a in actors if id(a) not in dead]
                for a in live:
                    while queue and busy[id(a)] < IN_FLIGHT_PER_REPLICA:
                        scan, outs = queue.popleft()
                        inflight[a.predict.remote(str(scan), outs, options)] = (scan, a)
                        busy[id(a)] += 1
                if not live and not inflight:
                    while queue:
                        scan, _ = queue.popleft()
                        failed[scan] = f"{scan}: not segmented: every Ray predict replica died ({last_error})"
                        bar.update()

            refill()
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                scan, actor = inflight.pop(ready[0])
                try:
                    res, err, notes = ray.get(ready[0])
                except Exception as exc:  # noqa: BLE001 - the replica died for good (retries spent)
                    res, notes = None, []
                    err = str(_task_failure(ray, exc, str(scan), self.max_retries, "run again with --resume"))
                    if isinstance(exc, ray.exceptions.RayActorError):
                        dead.add(id(actor))
                for note in notes:
                    notify(note)
                if res is not None:
                    done[scan] = res
                else:
                    failed[scan] = err
                    if progress:
                        bar.write(f"femurseg: failed: {err}", file=sys.stderr)
                    else:
                        notify(f"failed: {err}")
                bar.update()
                refill(err or "")
            bar.close()
            for a in actors:
                ray.kill(a, no_restart=True)
        order = [s for s, _ in plan]
        return P.BatchResult([done[s] for s in order if s in done], [(s, failed[s]) for s in order if s in failed],
                             skipped)

    def _default_replicas(self, ray: Any) -> int:
        total = ray.cluster_resources()
        by_cpu = int(float(total.get("CPU", 1.0)) // self.num_cpus)
        if self.num_gpus > 0:
            return max(1, min(by_cpu, int(float(total.get("GPU", 0.0)) // self.num_gpus)))
        return max(1, by_cpu)


def _check_reachable(addr: str, timeout: float = 5.0) -> None:
    """Fail fast (one line) when ``host:port`` / ``ray://host:port`` does not accept connections: ray.init
    would otherwise retry for minutes. "auto" and addresses without a port are left to Ray."""
    import socket

    hostport = addr.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if addr.strip().lower() in ("auto", "local") or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise FemursegError(f"--address {addr}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
                            f"`ray start --head` or check the address") from None


def _task_failure(ray: Any, exc: BaseException, what: str, retries: int, hint: str) -> Exception:
    """A one-line FemursegError for a failed Ray task (the cause's own FemursegError when it is one);
    programming errors in a task come back as the original RayTaskError (with the remote traceback)."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, FemursegError):
            return FemursegError(str(cause))
        if isinstance(cause, RETRY_EXCEPTIONS):
            return FemursegError(f"{what}: {type(cause).__name__}: {cause} (after {retries} retries); {hint}")
        return exc  # a bug: keep the remote traceback
    user = re.search(r"FemursegError: (.+)", str(exc))  # e.g. an actor whose __init__ (loading the run) failed
    if user:
        return FemursegError(f"{what}: a Ray worker could not start: {user.group(1).strip()}")
    kind = type(exc).__name__
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return FemursegError(f"{what}: the Ray worker died ({kind}{': ' + first if first else ''}) "
                         f"and {retries} retries did not help; {hint}")


def _set_threads(n: int) -> None:
    torch.set_num_threads(max(1, int(n)))


def _fold_task(run_dir: str, ds: Any, prepared: dict[str, Any], k: int, device: str | None, threads: int,
               hook: TaskHook | None) -> dict[str, Any]:
    """Body of one fold's Ray task: exactly :func:`femurseg.training.cv.train_fold`."""
    from femurseg.inference.run import load_run
    from femurseg.training.cv import train_fold

    _set_threads(threads)
    if hook is not None:
        hook("fold", str(k), Path(run_dir) / f"fold_{k}")
    prepared = copy.deepcopy(prepared)  # arrays from the object store are read-only; the local path's are not
    return train_fold(load_run(run_dir), ds, prepared, k, device=device, progress=False)


class _Replica:
    """A Ray actor holding one loaded copy of the run's models (a model replica)."""

    def __init__(self, run_dir: str, load: dict[str, Any], tiles: int, max_voxels: int, threads: int,
                 hook: TaskHook | None) -> None:
        from femurseg.ct.predict import load_any_predictor

        _set_threads(threads)
        self.hook = hook
        self.notes: list[str] = []
        self.pred = load_any_predictor(run_dir, notify=self.notes.append, **load)
        self.pred.tiles, self.pred.max_voxels = tiles, max_voxels

    def predict(self, scan: str, outs: Any, options: dict[str, Any]) -> tuple[Any, str | None, list[str]]:
        """``(CaseResult or None, error or None, notices)`` of one scan (:func:`femurseg.inference.predict.predict_case`)."""
        from femurseg.inference.predict import case_name, predict_case

        notes, self.notes = self.notes, []
        if self.hook is not None:
            self.hook("scan", case_name(Path(scan)), Path(outs.mask))
        res, err = predict_case(self.pred, Path(scan), outs, notify=notes.append, **options)
        return res, err, [n if n.startswith(("warning", "notice")) else f"notice: {n}" for n in notes]


def _absolute_dataset(ds: Any) -> Any:
    """The dataset with absolute paths (tasks may run in another working folder or on another node)."""
    cases = [dataclasses.replace(c, image=Path(c.image).resolve(),
                                 label=None if c.label is None else Path(c.label).resolve()) for c in ds.cases]
    return dataclasses.replace(ds, root=Path(ds.root).resolve(), cases=cases)


def _absolute_outputs(outs: Any) -> Any:
    return dataclasses.replace(outs, **{f.name: Path(getattr(outs, f.name)).resolve()
                                        for f in dataclasses.fields(outs) if getattr(outs, f.name) is not None})


def run_jobs(jobs: Sequence[Callable[[], Any]], backend: Any = None) -> list[Any]:
    """Run independent jobs, e.g. one :func:`femurseg.training.cv.run_cv` per grid configuration.

    Local back-end (None/"local"): one after the other, in order. Ray: all at once in driver threads
    -- each job submits its folds as Ray tasks and waits, so the cluster sees every (configuration,
    fold) task of the grid together. Every job runs to its end; then the first exception is raised.
    Returns the jobs' results in order.
    """
    if resolve_backend(backend) is None:
        return [job() for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(jobs)), thread_name_prefix="femurseg-grid") as pool:
        futures = [pool.submit(job) for job in jobs]
        outcomes = [(f.result() if f.exception() is None else f.exception()) for f in futures]
    for o in outcomes:
        if isinstance(o, BaseException):
            raise o
    return outcomes


# ============================================================================= torch.distributed


def shard_batches(items: Sequence[Any], batch_size: int, rank: int, world_size: int) -> list[list[Any]]:
    """Rank ``rank``'s batches of one epoch (``DistributedSampler``-like, deterministic).

    The epoch's items (already shuffled identically on every rank) are padded to a multiple of
    ``world_size`` by repeating items from the start, rank r takes ``items[r::world_size]`` and cuts
    them into batches of ``batch_size``. Every rank gets the same number of batches; the shards are
    disjoint (apart from the padding) and together cover the epoch; optimisation step j of the ranks
    together covers ``items[j*B*W:(j+1)*B*W]``: the batch a single process with batch ``B*W`` uses.
    """
    if world_size < 1 or not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"shard_batches: rank {rank}, world size {world_size}, batch size {batch_size}")
    n = len(items)
    if n == 0:
        return []
    total = math.ceil(n / world_size) * world_size
    padded = list(items) + [items[i % n] for i in range(total - n)]
    mine = padded[rank::world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


@dataclass
class DDP:
    """This process's place in a ``torchrun`` job (see :func:`init_ddp`); used by :func:`femurseg.training.fit.fit`
    and :func:`femurseg.training.cv.run_cv`."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def barrier(self) -> None:
        import torch.distributed as tdist

        if self.device.type == "cuda":
            tdist.barrier(device_ids=[self.device.index or 0])
        else:
            tdist.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``DistributedDataParallel(model)`` (batch norm -> SyncBatchNorm on GPUs); ``model`` itself
        keeps the weights (checkpoints hold its state dict, without a ``module.`` prefix)."""
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if synced is not model:  # only for a top-level batch-norm module; children are replaced in place
                raise FemursegError("--ddp: a model that is a single batch-norm layer cannot be trained")
            return DistributedDataParallel(model, device_ids=[self.device.index or 0])
        return DistributedDataParallel(model)

    def shard(self, items: Sequence[Any], batch_size: int) -> list[list[Any]]:
        return shard_batches(items, batch_size, self.rank, self.world_size)

    def _sum(self, values: Sequence[float]) -> list[float]:
        import torch.distributed as tdist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        return self._sum([value])[0] / self.world_size

    def evaluate(self, fn: Callable[..., tuple[float, float]], model: torch.nn.Module, val: Sequence[Any],
                 *args: Any) -> tuple[float, float]:
        """Validation split over the ranks: rank r evaluates ``val[r::world]`` with ``fn`` (the local
        :func:`femurseg.training.fit.evaluate`); returns the means over all cases (NaN without cases)."""
        mine = list(val)[self.rank::self.world_size]
        loss, dice = fn(model, mine, *args) if mine else (0.0, 0.0)
        s_loss, s_dice, count = self._sum([loss * len(mine), dice * len(mine), len(mine)])
        return (s_loss / count, s_dice / count) if count else (float("nan"), float("nan"))

    def describe(self, batch_size: int) -> dict[str, Any]:
        """Recorded in the run's config.json."""
        return {"world_size": self.world_size, "backend": self.backend, "per_rank_batch": int(batch_size),
                "effective_batch": int(batch_size) * self.world_size}


_DDP: DDP | None = None


def init_ddp(device: str | torch.device | None = None) -> DDP:
    """Join the ``torchrun`` process group (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``
    in the environment): NCCL with one GPU per rank (``cuda:LOCAL_RANK``) when CUDA is available and
    ``device`` is not "cpu", else gloo on the CPU. Idempotent."""
    global _DDP
    import torch.distributed as tdist

    missing = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise FemursegError(f"--ddp: {', '.join(missing)} not set; start the command with torchrun, e.g. "
                            "torchrun --standalone --nproc_per_node 2 $(which femurseg) train ... --ddp")
    if _DDP is not None and tdist.is_initialized():
        return _DDP
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    want = "auto" if device is None else str(device)
    cuda = torch.cuda.is_available() and not want.startswith("cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise FemursegError(f"--device {want}: CUDA is not available on this machine")
    if cuda:
        if local >= torch.cuda.device_count():
            raise FemursegError(f"--ddp: local rank {local} but only {torch.cuda.device_count()} GPU(s) visible; "
                                "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local)
    dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if cuda else "gloo", **({"device_id": dev} if cuda else {}))
        atexit.register(_destroy)
    _DDP = DDP(rank, world, local, dev)
    return _DDP


def _destroy() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()


def backend_from_options(backend: str = "local", *, address: str | None = None, num_cpus: float = 1.0,
                         num_gpus: float = 0.0, max_retries: int = 3, replicas: int | None = None) -> str | RayBackend:
    """The ``backend`` argument of :func:`femurseg.training.cv.run_cv` / :func:`femurseg.inference.predict.predict_command` from
    the command-line options ``--backend --address --num-cpus --num-gpus --max-retries --replicas``.

    Ray options with ``--backend local`` are refused (they would be silently ignored)."""
    name = str(backend).strip().lower()
    if name not in BACKENDS:
        raise FemursegError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if name == "local":
        given = [opt for opt, v, default in (("--address", address, None), ("--num-cpus", num_cpus, 1.0),
                                             ("--num-gpus", num_gpus, 0.0), ("--max-retries", max_retries, 3),
                                             ("--replicas", replicas, None)) if v != default]
        if given:
            raise FemursegError(f"{', '.join(given)}: only with --backend ray")
        return "local"
    return RayBackend(address=address, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, replicas=replicas)
