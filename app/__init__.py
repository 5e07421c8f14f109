"""mcp-medsam: box-prompted medical segmentation with MCP-MedSAM on the CPU, without PyTorch.

>>> from mcp_medsam import Segmenter
>>> seg = Segmenter.load()                                   # the bundled default model
>>> labels = seg.segment_image(img, [[x0, y0, x1, y1]], modality="XRay")
>>> volume_labels = seg.segment_volume(vol, [[x0, y0, z0, x1, y1, z1]], modality="CT")

Every error for a problem with the caller's input or install is a :class:`SegmentationError`.
"""

from .errors import InputError, ModelError, SegmentationError, UnknownModality
from .segmenter import Embedding, Segmenter

__all__ = ["Embedding", "InputError", "ModelError", "Segmenter", "SegmentationError", "UnknownModality"]
__version__ = "0.2.0"
