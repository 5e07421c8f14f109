"""Inference backends over the exported graphs (OpenVINO by default, ONNX Runtime optional).

Both read the graph files and input/output names from the manifest. OpenVINO runs with the
inference precision pinned per IR file (f32 unless a variant says otherwise): on CPUs with AMX or
AVX512-BF16 it would otherwise silently run bf16.

Precision (:func:`resolve_precision`): ``fp32`` runs the graphs' own files; ``bf16`` and ``int8`` run
a variant the manifest lists (``variants``: per graph a chain of IR segments, each compiled with its
own hint, so that the groups that lose masks stay f32); ``auto`` runs the fastest validated variant
this CPU supports (bf16 where OpenVINO reports bf16 support, INT8 with VNNI), else fp32.

On load the engine checks every graph file against the sizes and sha256 of ``manifest.json``
(hashing a file only when its size or mtime changed since it was last hashed: see
:class:`Fingerprints`), keeps OpenVINO's compiled models in a cache folder named by those hashes
(so a re-export into the same folder is compiled afresh), removes compiled blobs that changed
since they were written, and refuses NaN or infinite graph outputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import prompts
from .errors import EngineError, ManifestError, ModelError
from .io.atomic import write_json
from .locale_guard import keep_locale
from .manifest import MANIFEST_NAME, Manifest, SegmentSpec, bundled_weights, load_manifest, sha256_file

BACKENDS = ("openvino", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
DEFAULT_PRECISION = "auto"  # only validated variants are ever chosen by it: fp32 when none holds the bars
PRECISION_ENV = "MCP_MEDSAM_PRECISION"
AUTO_ORDER = ("bf16", "int8")  # fastest first (measured: README, bench)


class Runner(Protocol):
    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def openvino_module() -> Any:
    """``import openvino``, without importing its model-conversion API up front.

    ``openvino/__init__`` imports ``openvino.tools.ovc`` (convert_model: telemetry, the TensorFlow and
    PyTorch front-end helpers) inside ``try: ... except ImportError``; the runtime only compiles IR, and
    that import is ~30 % of ``import openvino`` (0.08 s CPU of every cold start here, measured). When openvino is
    not imported yet, the import is first refused (a None entry in ``sys.modules``, which the
    ``except`` skips), then allowed again and ``openvino.convert_model`` resolved on first use (PEP
    562), so the PyTorch side's exporter in the same process still finds it."""
    import sys

    if "openvino" in sys.modules:
        import openvino

        return openvino
    key = "openvino.tools.ovc"
    blocked = key not in sys.modules
    if blocked:
        sys.modules[key] = None  # type: ignore[assignment]
    try:
        import openvino
    finally:
        if blocked and sys.modules.get(key, 0) is None:
            del sys.modules[key]
    if blocked and not hasattr(openvino, "convert_model"):
        def _lazy(name: str) -> Any:
            if name == "convert_model":
                from openvino.tools.ovc import convert_model

                openvino.convert_model = convert_model
                return convert_model
            raise AttributeError(f"module 'openvino' has no attribute {name!r}")

        openvino.__getattr__ = _lazy  # type: ignore[attr-defined]
    return openvino


def _openvino_core(cache_dir: Path | None) -> Any:
    ov = openvino_module()
    core = ov.Core()
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            if os.access(cache_dir, os.W_OK):
                core.set_property({"CACHE_DIR": str(cache_dir)})
        except OSError:
            pass  # a read-only cache location only costs the compile time
    return core


def compile_openvino(model_or_path: Any, *, precision_hint: str = "f32", threads: int | None = None,
                     cache_dir: Path | None = None) -> Any:
    """An OpenVINO ``CompiledModel`` on the CPU, set up as every part of the project runs graphs.

    model_or_path: an IR file (``.xml``) or an in-memory ``openvino.Model`` (INT8 calibration);
    precision_hint: the pinned inference precision (f32 unless chosen on purpose); threads: CPU
    threads (default: all cores); cache_dir: the compiled-model cache (skipped when not writable).
    """
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision_hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if isinstance(model_or_path, Path):
        model_or_path = str(model_or_path)
    if cache_dir is not None and isinstance(model_or_path, str) and _weightless_cache():
        # The compiled blob then holds the compiled graph without its weights (~1 MB instead of ~45 MB
        # per precision; measured: the same load time, outputs bit-identical): they are read from the
        # IR's .bin, which the content-keyed cache folder already names.
        config["CACHE_MODE"] = "OPTIMIZE_SIZE"
    return _openvino_core(cache_dir).compile_model(model_or_path, "CPU", config)


@lru_cache(maxsize=1)
def _weightless_cache() -> bool:
    return hasattr(openvino_module().properties, "cache_mode")  # OpenVINO 2024.4 and later


def onnxruntime_session(path: str | Path, *, threads: int | None = None) -> Any:
    """An ONNX Runtime ``InferenceSession`` on the CPU; threads: intra-op threads (default: all cores)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise EngineError("--backend onnxruntime needs the onnxruntime package (pip install onnxruntime)") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU offers the variants: OpenVINO's ``OPTIMIZATION_CAPABILITIES`` (``BF16``, ``INT8``,
    ...) and the kernel's CPU flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""

    model: str
    capabilities: frozenset[str]
    flags: frozenset[str]

    def has(self, feature: str) -> bool:
        """``BF16``: OpenVINO runs bf16 natively (AVX512-BF16 or AMX); ``VNNI``: int8 dot products
        (AVX512-VNNI, AVX-VNNI or AMX-INT8); other names: an OpenVINO capability or a CPU flag."""
        if feature == "BF16":
            return "BF16" in self.capabilities
        if feature == "VNNI":
            return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
        return feature in self.capabilities or feature.lower() in self.flags

    def summary(self) -> str:
        shown = sorted(self.flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                                     "amx_int8", "avx512_fp16"})
        return f"{self.model}; OpenVINO: {', '.join(sorted(self.capabilities))}; flags: {', '.join(shown) or '-'}"


@lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    ov = openvino_module()
    core = ov.Core()
    caps = frozenset(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    model = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    flags: frozenset[str] = frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass  # not Linux: VNNI unknown, so auto never picks INT8 here
    return CpuFeatures(model, caps, flags)


def default_precision() -> str:
    """$MCP_MEDSAM_PRECISION, else :data:`DEFAULT_PRECISION`."""
    return os.environ.get(PRECISION_ENV) or DEFAULT_PRECISION


def set_default_precision(precision: str | None) -> None:
    """Make ``precision`` (None: leave it) the default of every later model load of this process and of
    the processes it starts (``$MCP_MEDSAM_PRECISION``), for runners that load the model themselves."""
    if precision is not None:
        if precision not in PRECISIONS:
            raise EngineError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        os.environ[PRECISION_ENV] = precision


def resolve_precision(manifest: Manifest, precision: str | None = None, *, backend: str = "openvino",
                      cpu: CpuFeatures | None = None) -> tuple[str, str]:
    """The precision to run (``fp32`` or a variant's name) and why, for a requested one (None: $MCP_MEDSAM_PRECISION,
    else auto). EngineError for an unknown name, a variant the folder lacks (ModelError), bf16 on a CPU
    without bf16 support (OpenVINO would emulate it, slower than fp32), or a variant with ONNX Runtime."""
    asked = precision or default_precision()
    if asked not in PRECISIONS:
        raise EngineError(f"unknown precision {asked!r}; choose one of {', '.join(PRECISIONS)}")
    if asked == "fp32":
        return "fp32", "asked for"
    if backend != "openvino":
        if asked == "auto":
            return "fp32", f"the {backend} backend runs the FP32 files"
        raise EngineError(f"--precision {asked} needs the openvino backend (the ONNX files are FP32)")
    if asked == "auto":
        if not manifest.variants:
            return "fp32", "the model folder has no faster variant"
        cpu = cpu or cpu_features()
        passed = []
        for name in AUTO_ORDER:
            v = manifest.variants.get(name)
            if v is None:
                continue
            if not v.validated:
                passed.append(f"{name} did not hold the agreement bars")
                continue
            missing = [r for r in v.requires if not cpu.has(r)]
            if missing:
                passed.append(f"{name} needs {', '.join(missing)}")
                continue
            return name, "auto: the fastest validated variant this CPU supports"
        return "fp32", "auto: " + "; ".join(passed)
    variant = manifest.variants.get(asked)
    if variant is None:
        raise ModelError(f"{manifest.folder}: no {asked} variant (this folder has: "
                         f"{', '.join(['fp32', *manifest.variants])}); add one with 'mcp-medsam variants'")
    if asked == "bf16" and not (cpu or cpu_features()).has("BF16"):
        raise EngineError(f"this CPU has no bf16 support (OpenVINO reports "
                          f"{', '.join(sorted((cpu or cpu_features()).capabilities))}): bf16 would be emulated, "
                          f"slower than fp32; use --precision auto or fp32")
    return asked, "asked for" + ("" if variant.validated else " (this variant did not hold the agreement bars)")


@dataclass
class CallStats:
    """Graph calls made and the FLOPs they stand for (for the floor-relative benchmark)."""

    calls: dict[str, int] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, graph: str, items: int, seconds: float) -> None:
        self.calls[graph] = self.calls.get(graph, 0) + 1
        self.items[graph] = self.items.get(graph, 0) + items
        self.seconds[graph] = self.seconds.get(graph, 0.0) + seconds

    def gflops(self, manifest: Manifest) -> float:
        return sum(manifest.graphs[g].gflops * n for g, n in self.items.items())


# ---------------------------------------------------------------- weights check, content-keyed cache

FINGERPRINTS = "fingerprints.json"


class Fingerprints:
    """sha256 of files, remembered with the (size, mtime) they had: a file is hashed again only when
    one of them changed (a re-export, a copy, a write), so a warm start costs a few stat calls.

    Kept as ``fingerprints.json`` in the compiled-model cache folder, keyed by absolute path; with
    no usable cache folder every file is hashed on every load (~35 ms for the default weights).
    A same-size rewrite that also restores the mtime is not seen here; ``verify-weights`` hashes
    everything.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        self.changed = False
        if path is not None:
            try:
                data = json.loads(path.read_text())
                if isinstance(data, dict) and isinstance(data.get("files"), dict):
                    self.records = data["files"]
            except (OSError, ValueError):
                pass  # unreadable or garbled: start afresh

    @staticmethod
    def _stat(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    @staticmethod
    def _same(recorded: list[int], now: list[int]) -> bool:
        # Image layers (docker save/load) keep mtimes to the second only: a whole-second mtime equal to
        # the recorded one truncated is the same file, so a container start does not hash the weights again.
        return recorded == now or (recorded[0] == now[0] and now[1] % 10 ** 9 == 0
                                   and now[1] == recorded[1] // 10 ** 9 * 10 ** 9)

    @staticmethod
    def _key(path: Path) -> str:
        return str(Path(path).absolute())

    def known(self, path: Path) -> str | None:
        """The remembered sha256 of ``path`` if it is unchanged since, else None."""
        rec = self.records.get(self._key(path))
        try:
            return str(rec["sha256"]) if rec is not None and self._same(rec["stat"], self._stat(path)) else None
        except (OSError, KeyError, TypeError, IndexError):
            return None

    def reference(self, path: Path) -> str | None:
        """The sha256 remembered for ``path``, whether or not it changed since."""
        rec = self.records.get(self._key(path))
        return rec.get("sha256") if isinstance(rec, dict) else None

    def sha256(self, path: Path) -> str:
        sha = self.known(path)
        if sha is None:
            stat = self._stat(path)  # before reading: a write during hashing shows as a change next time
            sha = sha256_file(path)
            self.remember(path, sha, stat)
        return sha

    def remember(self, path: Path, sha: str, stat: list[int] | None = None) -> None:
        self.records[self._key(path)] = {"stat": stat if stat is not None else self._stat(path), "sha256": sha}
        self.changed = True

    def forget(self, path: Path) -> None:
        if self.records.pop(self._key(path), None) is not None:
            self.changed = True

    def save(self) -> None:
        if self.changed and self.path is not None:
            self.records = {k: v for k, v in self.records.items() if os.path.exists(k)}  # no record outlives its file
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_json(self.path, {"files": self.records})
                self.changed = False
            except OSError:
                pass  # a read-only cache: hashed again next time


def check_weights(manifest: Manifest, files: list[Path], prints: Fingerprints) -> dict[str, str]:
    """sha256 per file name of ``files`` (the graph files a backend reads), checked against the
    manifest's records; ModelError naming the file on a size or hash mismatch. A folder exported
    before hashes were recorded is hashed but cannot be checked."""
    hashes = {}
    for path in files:
        rec = manifest.files.get(path.name)
        if manifest.files and rec is None:
            raise ModelError(f"{path}: not recorded in {MANIFEST_NAME} (files of a model folder come from one export)")
        if rec is not None and path.stat().st_size != rec.bytes:
            raise ModelError(f"{path}: {path.stat().st_size} bytes, {MANIFEST_NAME} records {rec.bytes} "
                             f"(truncated or replaced; restore it or export the folder again)")
        sha = prints.sha256(path)
        if rec is not None and sha != rec.sha256:
            raise ModelError(f"{path}: sha256 differs from {MANIFEST_NAME} (corrupted or replaced; restore it "
                             f"or export the folder again)")
        hashes[path.name] = sha
    return hashes


def content_key(hashes: dict[str, str], hints: dict[str, str] | None = None) -> str:
    """16 hex digits naming a set of graph files by content (the compiled-model cache folder's name).

    hints: file name -> inference precision for files not compiled in f32. OpenVINO's own cache key
    is the file path and does not change with the precision hint: a blob compiled for f32, loaded
    for bf16, crashes the process. So every hint is part of the folder's name (f32-only sets keep
    the name they always had)."""
    text = "\n".join(f"{name}:{sha}" for name, sha in sorted(hashes.items()))
    text += "".join(f"\n{name}@{hint}" for name, hint in sorted((hints or {}).items()) if hint != "f32")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _drop_changed_blobs(folder: Path, prints: Fingerprints) -> None:
    """Compiled blobs of a model's cache folder that changed since they were recorded are removed, so
    OpenVINO compiles them again instead of loading a damaged model."""
    for blob in folder.glob("*.blob"):
        ref = prints.reference(blob)
        if ref is None or prints.known(blob) is not None:
            continue
        try:
            stat = prints._stat(blob)
            if sha256_file(blob) == ref:
                prints.remember(blob, ref, stat)  # touched, not changed
                continue
            blob.unlink()
        except OSError:
            pass
        prints.forget(blob)


def _record_blobs(folder: Path, prints: Fingerprints) -> None:
    """Remember the blobs OpenVINO has just written (the reference :func:`_drop_changed_blobs` checks)."""
    for blob in folder.glob("*.blob"):
        if prints.reference(blob) is None:
            try:
                prints.sha256(blob)
            except OSError:
                pass


CACHE_KEEP_DAYS = 30


def _prune_cache(cache_dir: Path, used: Path) -> None:
    """Mark ``used`` as used now and remove the model folders of a cache not used for CACHE_KEEP_DAYS
    (each re-export leaves one behind)."""
    try:
        os.utime(used)
        cutoff = time.time() - CACHE_KEEP_DAYS * 86400
        for old in cache_dir.glob("model-*"):
            if old != used and old.is_dir() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
    except OSError:
        pass


def _ov_reason(exc: Exception) -> str:
    """The informative line of an OpenVINO exception (its text starts with C++ source locations)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    return (useful or lines or [exc.__class__.__name__])[-1]


def _openvino_runners(manifest: Manifest, precision: str, *, cache_dir: Path | None,
                      threads: int | None) -> dict[str, Runner]:
    # Compiled side by side: loading from the cache is mostly single-threaded work, so a cold start
    # overlaps the graphs (and a variant's segments) instead of paying for them in turn.
    from concurrent.futures import ThreadPoolExecutor

    chains = {name: manifest.segments(name, precision) for name in manifest.graphs}
    jobs = [seg for segs in chains.values() for seg in segs]
    openvino_module()  # imported once, here, rather than by the first of the threads

    def compile_segment(seg: SegmentSpec) -> Any:
        path = manifest.folder / seg.file
        try:
            return compile_openvino(path, precision_hint=seg.hint, threads=threads, cache_dir=cache_dir)
        except RuntimeError as exc:
            raise EngineError(f"{path}: OpenVINO cannot load this graph ({_ov_reason(exc)})") from None

    # Two IR parses at once can leave the process in the "C" locale (see locale_guard).
    with keep_locale(), ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        compiled = dict(zip(map(id, jobs), pool.map(compile_segment, jobs)))
    return {name: chain_runner([compiled[id(s)] for s in segs], segs, list(manifest.graphs[name].outputs),
                               where=manifest.folder)
            for name, segs in chains.items()}


def chain_runner(compiled: list[Any], segments: tuple[SegmentSpec, ...] | list[SegmentSpec], outputs: list[str], *,
                 where: Path | None = None) -> Runner:
    """One graph as a chain of compiled OpenVINO models (``compiled[i]`` for ``segments[i]``): feed in,
    the graph's ``outputs`` (copies) out. A single model with the graph's outputs runs as it is."""
    steps = []
    for model, seg in zip(compiled, segments):
        # Output i of the compiled model is the manifest name among its tensor names.
        names = [next((n for n in seg.outputs if n in out.get_names()), None) for out in model.outputs]
        if None in names:
            have = [sorted(o.get_names()) for o in model.outputs]
            raise EngineError(f"{(where or Path('.')) / seg.file}: outputs {have} do not match {MANIFEST_NAME} "
                              f"({', '.join(seg.outputs)})")
        steps.append((model.create_infer_request(), seg.inputs, names))
    if len(steps) == 1 and steps[0][2] == outputs:
        request, n_out = steps[0][0], len(outputs)

        def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            request.infer(feed, share_inputs=True)
            return [request.get_output_tensor(i).data.copy() for i in range(n_out)]

        return run

    def run_chain(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # A segment's outputs stay in its request's buffers until the next call, so later segments
        # read them without a copy; only the graph's outputs are copied out.
        tensors: dict[str, np.ndarray] = dict(feed)
        for request, ins, outs in steps:
            request.infer({k: tensors[k] for k in ins}, share_inputs=True)
            for i, k in enumerate(outs):
                tensors[k] = request.get_output_tensor(i).data
        return [np.array(tensors[k]) for k in outputs]

    return run_chain


def _onnxruntime_runners(manifest: Manifest, *, threads: int | None) -> dict[str, Runner]:
    runners: dict[str, Runner] = {}
    for name in manifest.graphs:
        path = manifest.graph_file(name, "onnx")
        try:
            sess = onnxruntime_session(path, threads=threads)
        except EngineError:
            raise
        except Exception as exc:  # onnxruntime's own exception classes (InvalidProtobuf, Fail, ...)
            raise EngineError(f"{path}: ONNX Runtime cannot load this graph ({str(exc).strip()[-300:]})") from None
        runners[name] = lambda feed, sess=sess: sess.run(None, feed)
    return runners


class Engine:
    """The three graphs of an exported model behind typed calls.

    encode: (N, 3, S, S) float32 -> (N, C, E, E) float32.
    decode: the per-box graph's feed for B boxes (embeddings (K, C, E, E), indices, grid boxes,
            crops, modality rows) -> logits (B, S, S), iou (B,), category logits (B, 11).
    clip:   (B, 3, 224, 224) -> (B, 512) (models with a CLIP tower only).
    """

    def __init__(self, manifest: Manifest, *, backend: str = "openvino", cache_dir: Path | None = None,
                 threads: int | None = None, precision: str | None = "fp32") -> None:
        """cache_dir: OpenVINO's compiled models go to ``cache_dir/model-<content key>/`` and the file
        fingerprints to ``cache_dir/fingerprints.json`` (None: no cache, every file hashed per load);
        precision: ``fp32``, ``bf16``, ``int8`` or ``auto`` (None: $MCP_MEDSAM_PRECISION, else auto), see
        :func:`resolve_precision`; the one run is :attr:`precision`, and why :attr:`precision_reason`."""
        if backend not in BACKENDS:
            raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.manifest = manifest
        self.backend = backend
        self.precision, self.precision_reason = resolve_precision(manifest, precision, backend=backend)
        self.stats = CallStats()
        self.compiled_cache: Path | None = None  # the model's compiled-model cache folder, when one is used
        prints = Fingerprints(Path(cache_dir) / FINGERPRINTS if cache_dir is not None else None)
        try:
            files = manifest.backend_files(backend, self.precision)
            hints = {s.file: s.hint for g in manifest.graphs for s in manifest.segments(g, self.precision)} \
                if backend == "openvino" else {}
            self.weights_key = content_key(check_weights(manifest, files, prints), hints)
            if backend == "openvino":
                model_cache = Path(cache_dir) / f"model-{self.weights_key}" if cache_dir is not None else None
                if model_cache is not None and model_cache.is_dir():
                    _drop_changed_blobs(model_cache, prints)
                self._run = _openvino_runners(manifest, self.precision, cache_dir=model_cache, threads=threads)
                if model_cache is not None and model_cache.is_dir() and os.access(model_cache, os.W_OK):
                    _record_blobs(model_cache, prints)
                    _prune_cache(Path(cache_dir), model_cache)
                    self.compiled_cache = model_cache
            else:
                self._run = _onnxruntime_runners(manifest, threads=threads)
        except ManifestError as exc:
            raise EngineError(str(exc)) from exc
        except OSError as exc:  # a graph file that cannot be read
            raise EngineError(f"{exc.filename or manifest.folder}: cannot read it ({exc.strerror or exc})") from None
        finally:
            prints.save()
        self._names = {n: (list(g.inputs), list(g.outputs)) for n, g in manifest.graphs.items()}

    @classmethod
    def of_runners(cls, manifest: Manifest, runners: dict[str, Runner], *, precision: str) -> Engine:
        """An engine over graphs compiled elsewhere (``runners``: graph name -> feed -> outputs; the
        precision study's in-memory variants): no file is read or checked, nothing is cached."""
        engine = cls.__new__(cls)
        engine.manifest, engine.backend, engine.stats = manifest, "openvino", CallStats()
        engine.precision, engine.precision_reason = precision, "in memory"
        engine.compiled_cache, engine.weights_key = None, ""
        engine._run = dict(runners)
        engine._names = {n: (list(g.inputs), list(g.outputs)) for n, g in manifest.graphs.items()}
        return engine

    def _call(self, graph: str, feed: dict[str, np.ndarray], items: int) -> list[np.ndarray]:
        t = time.perf_counter()
        out = self._run[graph](feed)
        self.stats.add(graph, items, time.perf_counter() - t)
        # A float64 sum carries any NaN or inf (and cannot overflow for float32 values): ~1 ms per
        # image embedding, so damaged weights fail the case instead of writing empty masks.
        for o in out:
            if o.dtype.kind == "f" and not math.isfinite(float(o.sum(dtype=np.float64))):
                raise EngineError(f"the {graph} graph of {self.manifest.folder} gave NaN or infinite outputs "
                                  f"(damaged weights? check them with 'mcp-medsam verify-weights')")
        return out

    def encode(self, images: np.ndarray) -> np.ndarray:
        (name,), _ = self._names["image_encoder"]
        return self._call("image_encoder", {name: images}, len(images))[0]

    def clip(self, crops: np.ndarray) -> np.ndarray:
        (name,), _ = self._names["clip_image"]
        return self._call("clip_image", {name: crops}, len(crops))[0]

    def decode(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """feed: :func:`mcp_medsam.prompts.decoder_feed` for B boxes -> logits (B, S, S), iou (B,),
        category logits (B, 11)."""
        ins, _ = self._names["decoder"]
        if "point_coords" in ins and "point_coords" not in feed:
            # A box-only feed for a graph that takes clicks: one padding point per box, which the graph
            # masks out: the box-only outputs (manifest "prompts", README "Click prompts in the model").
            feed = {**feed, **prompts.padding_points(len(feed["boxes"]))}
        missing = [k for k in ins if k not in feed]
        if missing:
            raise EngineError(f"the decoder graph needs {', '.join(missing)} (a model with a CLIP tower needs "
                              f"CLIP image features)")
        logits, iou, category = self._call("decoder", {k: feed[k] for k in ins}, len(feed["boxes"]))
        return logits[:, 0], iou[:, 0], category

    @property
    def has_clip(self) -> bool:
        return "clip_image" in self._run


@dataclass
class WeightsCheck:
    """What ``mcp-medsam verify-weights`` found: one line per file, and how many are not right."""

    folder: Path
    lines: list[str]
    problems: int
    checked: int

    @property
    def ok(self) -> bool:
        return self.problems == 0


def verify_weights(folder: Path | None = None) -> WeightsCheck:
    """Hash every file ``manifest.json`` records (always in full, no fingerprints) and compare sizes
    and sha256; graph files it does not record count as problems. None: the bundled weights."""
    manifest = load_manifest(folder if folder is not None else bundled_weights())
    root = manifest.folder
    lines, problems = [], 0
    if not manifest.files:
        lines.append(f"{MANIFEST_NAME}: no file hashes (exported before they were recorded); export the folder "
                     f"again to make it verifiable")
        problems += 1
    graph_files = set()
    for g in manifest.graphs.values():
        for f in g.files.values():
            graph_files |= {f, Path(f).with_suffix(".bin").name} if f.endswith(".xml") else {f}
    for v in manifest.variants.values():
        for segs in v.graphs.values():
            graph_files |= {f for s in segs for f in (s.file, Path(s.file).with_suffix(".bin").name)}
    for name in sorted(graph_files - set(manifest.files)) if manifest.files else ():
        lines.append(f"{name}: NOT RECORDED in {MANIFEST_NAME}")
        problems += 1
    for name, rec in manifest.files.items():
        path = root / name
        try:
            size = path.stat().st_size
            if size != rec.bytes:
                status = f"WRONG SIZE: {size} bytes, recorded {rec.bytes}"
            elif sha256_file(path) != rec.sha256:
                status = "SHA256 MISMATCH (corrupted or replaced)"
            else:
                status = "ok"
        except FileNotFoundError:
            status = "MISSING"
        except OSError as exc:
            status = f"UNREADABLE ({exc.strerror or exc})"
        problems += status != "ok"
        lines.append(f"{name}: {status}" + (f" ({rec.bytes} bytes, sha256 {rec.sha256[:16]}...)" * (status == "ok")))
    return WeightsCheck(folder=root, lines=lines, problems=problems, checked=len(manifest.files))


def warm_cache(weights: Path | None = None, *, cache_dir: Path | None = None, precision: str | None = None) -> Path:
    """``mcp-medsam warmup``: check and compile a model folder (None: the bundled weights) at a precision
    (None: what a run would choose, see :func:`resolve_precision`) into the compiled-model cache (None:
    :func:`default_cache_dir`); returns the model's cache folder. EngineError when that cache cannot be written."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    engine = Engine(load_manifest(weights if weights is not None else bundled_weights()), cache_dir=cache,
                    precision=precision)
    if engine.compiled_cache is None:
        raise EngineError(f"cannot use {cache} as the compiled-model cache (not a writable folder)")
    return engine.compiled_cache


def default_cache_dir() -> Path:
    """OpenVINO compiled-model cache: $MCP_MEDSAM_CACHE, else ~/.cache/mcp-medsam/openvino."""
    env = os.environ.get("MCP_MEDSAM_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mcp-medsam" / "openvino"

