"""The exported model folder describes itself in ``manifest.json``; the runtime reads it.

Sizes, graph files, input/output names, the modality table and preprocessing constants come
from here, never from constants in the runtime. ``files`` records the size and sha256 of every
file the export wrote (the engine checks them on load; ``mcp-medsam verify-weights`` on demand).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
WEIGHTS_ENV = "MCP_MEDSAM_WEIGHTS"


def bundled_weights() -> Path:
    """The default model folder: $MCP_MEDSAM_WEIGHTS if set, else the weights installed with the package.

    A wheel carries them as package data (``mcp_medsam/weights/``); a source checkout or an
    editable install reads the repository's top-level ``weights/`` folder, which the wheel is built from.
    """
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env)
    from importlib.resources import files

    installed = Path(str(files(__package__))) / "weights"
    if (installed / MANIFEST_NAME).is_file():
        return installed
    return Path(__file__).resolve().parent.parent / "weights"


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_records(folder: str | Path) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` of every file in an exported folder but the manifest
    (the ``files`` entry the exporter writes)."""
    folder = Path(folder)
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}


@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int | str, ...]  # str = dynamic axis name
    dtype: str


@dataclass(frozen=True)
class GraphSpec:
    name: str
    files: dict[str, str]  # format ("openvino", "onnx") -> file name inside the folder
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    gflops: float  # per item of the batch axis (per image for the encoder, per box for the decoder)


HINTS = ("f32", "bf16")  # OpenVINO INFERENCE_PRECISION_HINT values a segment may be compiled with


@dataclass(frozen=True)
class SegmentSpec:
    """One IR file of a graph's chain, compiled with its own inference precision.

    inputs: tensor names it reads (the graph's inputs or outputs of earlier segments); outputs: the
    names it writes (later segments' inputs and the graph's outputs). A graph run as one IR file is a
    chain of one segment whose inputs and outputs are the graph's.
    """

    file: str
    hint: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class VariantSpec:
    """A faster precision of the model (``variants`` in the manifest): per graph it changes, the chain
    of segments that replaces the graph's FP32 file; the other graphs run as in FP32.

    requires: CPU features it needs to be faster than FP32 (``BF16``: OpenVINO reports bf16
    support; ``VNNI``: the CPU's int8 dot-product instructions); validated: it met the agreement
    bars against FP32 when it was written (``auto`` runs validated variants only); raw: the
    manifest's record (groups kept in FP32, measured agreement, the bars).
    """

    name: str
    requires: tuple[str, ...]
    graphs: dict[str, tuple[SegmentSpec, ...]]
    validated: bool
    raw: dict[str, Any]


@dataclass(frozen=True)
class Manifest:
    folder: Path
    raw: dict[str, Any]
    precision: str
    image_size: int
    embedding_size: int
    crop_size: int
    clip_crop_size: int
    has_clip: bool
    modality_tokens: tuple[str, ...]  # row i of the decoder's modality table
    propagation_margin: int
    graphs: dict[str, GraphSpec]
    files: dict[str, FileRecord]  # empty for folders exported before hashes were recorded
    variants: dict[str, VariantSpec] = field(default_factory=dict)  # "bf16", "int8": faster precisions

    @property
    def embed_dim(self) -> int:
        """Channels of the image embedding, from the decoder's input spec."""
        return int(self.graphs["decoder"].inputs["image_embeddings"].shape[1])

    @property
    def reads_crops(self) -> bool:
        """Whether the per-box graph reads the 64x64 content crops (False where the export folded an
        input-independent crop CNN into a constant: ``graphs.decoder.folded``)."""
        return "crops" in self.graphs["decoder"].inputs

    def modality_row(self, token: str) -> int | None:
        try:
            return self.modality_tokens.index(token)
        except ValueError:
            return None

    def graph_file(self, graph: str, fmt: str) -> Path:
        spec = self.graphs.get(graph)
        if spec is None or fmt not in spec.files:
            have = sorted({f for g in self.graphs.values() for f in g.files})
            raise ManifestError(
                f"{self.folder}: no {fmt} file for graph {graph!r} (this folder has: {', '.join(have) or 'none'})"
            )
        path = self.folder / spec.files[fmt]
        if not path.is_file():
            raise ManifestError(f"{path}: listed in {MANIFEST_NAME} but missing")
        if fmt == "openvino" and not path.with_suffix(".bin").is_file():
            raise ManifestError(f"{path.with_suffix('.bin')}: the weights of {path.name} are missing")
        return path

    def segments(self, graph: str, precision: str = "fp32") -> tuple[SegmentSpec, ...]:
        """The IR chain OpenVINO runs for ``graph`` at ``precision`` (``fp32`` or a variant's name):
        the variant's segments where it changes the graph, else the graph's IR file in f32."""
        variant = self.variants.get(precision)
        if variant is not None and graph in variant.graphs:
            return variant.graphs[graph]
        if precision != "fp32" and variant is None:
            raise ManifestError(f"{self.folder}: no {precision} variant (this folder has: "
                                f"{', '.join(['fp32', *self.variants])})")
        spec = self.graphs[graph]
        return (SegmentSpec(self.graph_file(graph, "openvino").name, "f32", tuple(spec.inputs), tuple(spec.outputs)),)

    def backend_files(self, backend: str, precision: str = "fp32") -> list[Path]:
        """Every file a backend reads: each graph's IR (``.xml`` and its ``.bin``; a variant's segment
        files at ``precision``) or ONNX file.

        Raises ManifestError when one is missing."""
        paths = []
        for name in self.graphs:
            if backend == "onnxruntime":
                paths.append(self.graph_file(name, "onnx"))
                continue
            for seg in self.segments(name, precision):
                path = self._ir_file(seg.file)
                paths += [path, path.with_suffix(".bin")]
        return paths

    def _ir_file(self, name: str) -> Path:
        path = self.folder / name
        if not path.is_file():
            raise ManifestError(f"{path}: listed in {MANIFEST_NAME} but missing")
        if not path.with_suffix(".bin").is_file():
            raise ManifestError(f"{path.with_suffix('.bin')}: the weights of {path.name} are missing")
        return path


def _specs(d: dict[str, Any]) -> dict[str, TensorSpec]:
    return {k: TensorSpec(tuple(v["shape"]), v["dtype"]) for k, v in d.items()}


def _inside(path: Path, name: Any) -> str:
    """A file name of the manifest, refused unless it names a file directly inside the folder."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ManifestError(f"{path}: graph file {name!r} is not a plain file name inside the folder "
                            f"(paths outside the model folder are refused)")
    return name


def _records(path: Path, raw: Any) -> dict[str, FileRecord]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: 'files' is not an object of file records")
    out = {}
    for name, rec in raw.items():
        _inside(path, name)
        if not (isinstance(rec, dict) and isinstance(rec.get("bytes"), int)
                and isinstance(rec.get("sha256"), str) and _SHA256.match(rec["sha256"])):
            raise ManifestError(f"{path}: the record of {name} needs 'bytes' (an integer) and 'sha256' (64 hex digits)")
        out[name] = FileRecord(rec["bytes"], rec["sha256"])
    return out


def _names(path: Path, raw: Any, default: tuple[str, ...]) -> tuple[str, ...]:
    if raw is None:
        return default
    if not isinstance(raw, list) or not all(isinstance(n, str) and n for n in raw):
        raise ManifestError(f"{path}: a segment's inputs and outputs are lists of tensor names")
    return tuple(raw)


def _variants(path: Path, raw: Any, graphs: dict[str, GraphSpec]) -> dict[str, VariantSpec]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: 'variants' is not an object")
    out = {}
    for name, v in raw.items():
        if name not in ("bf16", "int8") or not isinstance(v, dict) or not isinstance(v.get("graphs"), dict):
            raise ManifestError(f"{path}: variant {name!r} is not a bf16 or int8 record with 'graphs'")
        chains = {}
        for g, rec in v["graphs"].items():
            if g not in graphs or not isinstance(rec, dict) or not isinstance(rec.get("segments"), list) \
                    or not rec["segments"]:
                raise ManifestError(f"{path}: variant {name}: {g!r} needs a graph of the folder and its 'segments'")
            spec = graphs[g]
            segs = []
            for seg in rec["segments"]:
                if not isinstance(seg, dict) or seg.get("hint") not in HINTS or not str(seg.get("file", "")).endswith(
                        ".xml"):
                    raise ManifestError(f"{path}: variant {name}: a segment of {g} needs an .xml 'file' and a "
                                        f"'hint' ({' or '.join(HINTS)})")
                segs.append(SegmentSpec(_inside(path, seg["file"]), seg["hint"],
                                        _names(path, seg.get("inputs"), tuple(spec.inputs)),
                                        _names(path, seg.get("outputs"), tuple(spec.outputs))))
            chains[g] = tuple(segs)
        requires = v.get("requires", [])
        if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
            raise ManifestError(f"{path}: variant {name}: 'requires' is a list of CPU features")
        out[name] = VariantSpec(name, tuple(requires), chains, v.get("validated") is True, v)
    return out


def load_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST_NAME}; is this a folder written by 'mcp-medsam export'?")
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ManifestError(f"{path}: malformed manifest (a JSON {type(raw).__name__}, not an object)")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"{path}: format_version {raw.get('format_version')} "
                                f"(this runtime reads {FORMAT_VERSION})")
        pre = raw["preprocessing"]
        mod = raw["modalities"]
        graphs = {
            name: GraphSpec(name, {fmt: _inside(path, f) for fmt, f in dict(g["files"]).items()},
                            _specs(g["inputs"]), _specs(g["outputs"]), float(g["gflops"]))
            for name, g in raw["graphs"].items()
        }
        return Manifest(
            folder=folder, raw=raw, precision=raw["precision"], image_size=int(pre["image_size"]),
            embedding_size=int(pre["embedding_size"]), crop_size=int(pre["crop_size"]),
            clip_crop_size=int(pre["clip_crop_size"]), has_clip="clip_image" in graphs,
            modality_tokens=tuple(mod["tokens"]), propagation_margin=int(pre["propagation_margin"]), graphs=graphs,
            files=_records(path, raw.get("files")), variants=_variants(path, raw.get("variants"), graphs),
        )
    except ManifestError:
        raise
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: malformed manifest (not UTF-8 text)") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{path}: malformed manifest ({exc!r})") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read it ({exc.strerror or exc})") from None
