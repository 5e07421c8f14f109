"""The exported model folder describes itself in ``manifest.json``; the runtime reads it.

Sizes, graph files, input/output names, the modality table and preprocessing constants come
from here, never from constants in the runtime.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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
    category_index: dict[str, int]
    categories: tuple[str, ...]
    propagation_margin: int
    graphs: dict[str, GraphSpec]

    @property
    def embed_dim(self) -> int:
        """Channels of the image embedding, from the decoder's input spec."""
        return int(self.graphs["decoder"].inputs["image_embeddings"].shape[1])

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
        return path


def _specs(d: dict[str, Any]) -> dict[str, TensorSpec]:
    return {k: TensorSpec(tuple(v["shape"]), v["dtype"]) for k, v in d.items()}


def load_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST_NAME}; is this a folder written by 'mcp-medsam export'?")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"{path}: format_version {raw.get('format_version')} "
                                f"(this runtime reads {FORMAT_VERSION})")
        pre = raw["preprocessing"]
        mod = raw["modalities"]
        graphs = {
            name: GraphSpec(name, dict(g["files"]), _specs(g["inputs"]), _specs(g["outputs"]), float(g["gflops"]))
            for name, g in raw["graphs"].items()
        }
        return Manifest(
            folder=folder, raw=raw, precision=raw["precision"], image_size=int(pre["image_size"]),
            embedding_size=int(pre["embedding_size"]), crop_size=int(pre["crop_size"]),
            clip_crop_size=int(pre["clip_crop_size"]), has_clip="clip_image" in graphs,
            modality_tokens=tuple(mod["tokens"]), category_index=dict(mod["category_index"]),
            categories=tuple(mod["categories"]), propagation_margin=int(pre["propagation_margin"]), graphs=graphs,
        )
    except ManifestError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: malformed manifest ({exc!r})") from exc
