"""The Dask backend of ``mcp-medsam predict --dask``: one task per case, spread over a cluster.

``--dask local:N`` starts a LocalCluster of N worker processes with one thread each;
``--dask tcp://HOST:8786`` (or another Dask address, or a scheduler file ``*.json`` as
``dask scheduler --scheduler-file`` writes it) joins a running cluster. Each worker loads the model
once, when :class:`SegmenterPlugin` is registered (also on a worker that joins or is restarted
later), and keeps it for every task; a worker with several threads runs one case at a time, with
that many inference threads. The workers read the inputs and write the outputs themselves (the
folders must be on a file system they share with the client), through the same
:func:`mcp_medsam.batch.run_case` as a single process: atomically (temp file + rename in the output
folder), and deterministically, so a case that Dask reruns after a worker died is written whole,
once, with the same labels. Only the timing row travels back; the client writes it to the timing CSV
as it arrives and shows a progress bar.

A failing case is a failed row, not a failed run; a case whose worker died more often than
``distributed.scheduler.allowed-failures`` (default 3) is a failed row too. Needs the ``dask`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import InputError, ModelError, SegmentationError, UnknownModality, UsageError

try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # the dask extra is optional: run_dask says how to install it
    WorkerPlugin = object  # type: ignore[assignment,misc]

_SCHEMES = ("tcp://", "tls://", "ws://", "wss://", "ucx://", "inproc://")
INSTALL_HINT = "--dask needs the dask extra: pip install 'mcp-medsam[dask]'"


@dataclass(frozen=True)
class DaskTarget:
    """Where ``--dask`` points: a LocalCluster of ``workers`` processes, a scheduler ``address``, or
    a ``scheduler_file``."""

    workers: int = 0
    address: str | None = None
    scheduler_file: Path | None = None

    @property
    def local(self) -> bool:
        return self.workers > 0


def parse_dask(spec: str) -> DaskTarget:
    """``local:N``, ``tcp://HOST:PORT`` (tls://, ws://, ... too) or ``PATH.json`` (a scheduler file);
    UsageError otherwise."""
    text = spec.strip()
    if text.lower().startswith("local:"):
        n = text.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise UsageError(f"--dask {spec!r}: local:N needs a number of workers N >= 1 (e.g. local:2)")
        return DaskTarget(workers=int(n))
    if text.lower().startswith(_SCHEMES):
        if ":" not in text.split("://", 1)[1]:
            raise UsageError(f"--dask {spec!r}: a scheduler address needs its port (e.g. tcp://HOST:8786)")
        return DaskTarget(address=text)
    if text.lower().endswith(".json"):
        path = Path(text)
        if not path.is_file():
            raise UsageError(f"--dask {spec!r}: no scheduler file there")
        return DaskTarget(scheduler_file=path.resolve())
    raise UsageError(f"--dask {spec!r}: expected local:N (N worker processes here), a scheduler address such as "
                     f"tcp://HOST:8786, or a scheduler file (.json)")


# ---------------------------------------------------------------- on the workers


class SegmenterPlugin(WorkerPlugin):
    """Loads the model on a worker once and keeps it for every case the worker runs.

    A problem loading it (a weights folder the worker cannot read, say) is kept as ``error`` rather
    than raised, so that the client reports it in one line (:func:`plugin_errors`) instead of each
    worker logging a traceback.
    """

    idempotent = False

    def __init__(self, *, weights: str | None, backend: str, threads: int | None, cache_dir: str | None,
                 max_batch: int) -> None:
        self.weights, self.backend, self.threads = weights, backend, threads
        self.cache_dir, self.max_batch = cache_dir, max_batch
        self.segmenter: Any = None
        self.error: str | None = None
        self.lock: threading.Lock | None = None

    async def setup(self, worker: Any) -> None:
        from .segmenter import Segmenter

        self.lock = threading.Lock()
        threads = self.threads or worker.state.nthreads

        def load() -> Any:
            return Segmenter.load(self.weights, backend=self.backend, threads=threads, cache_dir=self.cache_dir,
                                  max_batch=self.max_batch)

        try:  # compiling takes a while: off the worker's event loop, which keeps answering the scheduler
            self.segmenter = await asyncio.get_running_loop().run_in_executor(None, load)
        except SegmentationError as exc:
            self.error = str(exc)
        except Exception as exc:  # an internal error: still one line, on the client
            self.error = f"{exc.__class__.__name__}: {exc}"

    def teardown(self, worker: Any) -> None:
        self.segmenter = None


def worker_problem(name: str, modality: str | None = None, dask_worker: Any = None) -> tuple[str, str] | None:
    """On a worker (``Client.run``): ("model", why) when its plugin ``name`` has no model,
    ("modality", why) when the model does not know ``modality``; None when all is well."""
    plugin = dask_worker.plugins.get(name)
    if plugin is None:
        return "model", "the model plugin is not registered on this worker"
    if plugin.error is not None:
        return "model", plugin.error
    if modality is not None:
        try:
            plugin.segmenter.modality_row(modality)
        except SegmentationError as exc:
            return "modality", str(exc)
    return None


def case_task(path: str, out_dir: str, *, plugin: str, options: dict[str, Any]) -> dict[str, Any]:
    """One case on a worker: :func:`mcp_medsam.batch.run_case` with the worker's model; returns the
    timing row's fields (a :class:`mcp_medsam.batch.CaseResult` as a dict)."""
    from distributed import get_worker

    from .batch import run_case

    p = get_worker().plugins.get(plugin)
    if p is None or p.segmenter is None:
        raise ModelError(p.error if p is not None and p.error else "the model is not loaded on this worker")
    with p.lock:  # one case at a time per model: its inference requests are not shared between threads
        return asdict(run_case(p.segmenter, Path(path), Path(out_dir), **options))


# ---------------------------------------------------------------- on the client


@contextlib.contextmanager
def connect(target: DaskTarget) -> Iterator[Any]:
    """A ``distributed.Client`` on the target (a LocalCluster started for it and closed after)."""
    try:
        import distributed
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    cluster = None
    try:
        if target.local:
            # Processes, not threads: each worker has its own interpreter and model, as on a cluster.
            cluster = distributed.LocalCluster(n_workers=target.workers, threads_per_worker=1, processes=True,
                                               dashboard_address=None)
            client = distributed.Client(cluster)
        else:
            where = target.address or str(target.scheduler_file)
            try:
                client = (distributed.Client(target.address, timeout="30s") if target.address else
                          distributed.Client(scheduler_file=str(target.scheduler_file), timeout="30s"))
            except (OSError, TimeoutError, ValueError) as exc:
                raise InputError(f"cannot reach the Dask scheduler at {where} ({exc})") from None
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def _failed_row(case: str, exc: BaseException | None, status: str, allowed: int) -> dict[str, Any]:
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        return {"case": case, "status": "failed",
                "message": f"the Dask workers running this case died {allowed + 1} times (out of memory?)"}
    if isinstance(exc, SegmentationError):
        return {"case": case, "status": "failed", "message": str(exc)}
    if exc is None:
        return {"case": case, "status": "error", "message": f"the Dask task ended as {status!r}"}
    return {"case": case, "status": "error", "message": f"{exc.__class__.__name__}: {exc}"}


def run_dask(target: DaskTarget, files: list[Path], out_dir: Path, *, load: dict[str, Any],
             options: dict[str, Any], earlier: dict[str, Any], record: Callable[[dict[str, Any]], None],
             progress: bool, default_modality: str | None = None) -> None:
    """Run ``files`` as one Dask task each; ``record(row)`` for each timing row (a CaseResult's fields)
    as it arrives, on the client, in the order cases finish.

    load: :class:`SegmenterPlugin`'s keywords; options: :func:`~mcp_medsam.batch.run_case`'s keywords
    for every case; earlier: case name -> its earlier timing row (for ``skip_existing``). Before any
    case is submitted: ModelError when a worker cannot load the model, UnknownModality when the model
    does not know ``default_modality``.
    """
    with connect(target) as client:
        import dask
        from distributed import as_completed

        allowed = int(dask.config.get("distributed.scheduler.allowed-failures", 3))
        token = f"mcp-medsam-{uuid.uuid4().hex[:10]}"
        try:
            client.register_plugin(SegmenterPlugin(**load), name=token)
        except Exception as exc:  # e.g. a worker without mcp_medsam cannot even unpickle the plugin
            raise ModelError(f"the Dask workers cannot take the model plugin ({exc.__class__.__name__}: {exc}); "
                             f"every worker needs mcp-medsam installed, the same version as here") from None
        try:
            problems = {w: e for w, e in client.run(worker_problem, token, default_modality).items() if e}
            if problems:
                worker, (kind, why) = next(iter(problems.items()))
                if kind == "modality":
                    raise UnknownModality(why)
                raise ModelError(f"{len(problems)} Dask worker(s) cannot load the model ({worker}: {why})")
            if not client.scheduler_info().get("workers"):
                print(f"note: the Dask scheduler at {client.scheduler.address} has no workers yet; waiting for them",
                      file=sys.stderr, flush=True)
            names: dict[str, str] = {}
            futures = []
            for path in files:
                key = f"{token}:{path.name}"  # the case name in the key: dashboards and logs show it
                names[key] = path.name
                futures.append(client.submit(case_task, str(path), str(out_dir), plugin=token, key=key, pure=False,
                                             options={**options, "earlier": earlier.get(path.name)}))
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(futures), file=sys.stderr, unit="case", dynamic_ncols=True)
            try:
                for fut in as_completed(futures):
                    if fut.status == "finished":
                        row = fut.result()
                    else:
                        exc = fut.exception() if fut.status == "error" else None
                        row = _failed_row(names[fut.key], exc, fut.status, allowed)
                    fut.release()
                    record(row)
                    if bar is not None:
                        bar.set_postfix_str(names[fut.key][:40])
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
        finally:
            if not target.local:  # a long-lived cluster: do not leave a model behind on every worker
                with contextlib.suppress(Exception):
                    client.unregister_worker_plugin(token)
