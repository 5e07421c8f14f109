"""MCP-MedSAM and LiteMedSAM in PyTorch, one file per sub-network (segment-anything layout)."""

from .mask_decoder import DecoderOutput, MaskDecoderF4, SamMaskDecoder
from .sam import MODEL_CONFIGS, LiteMedSAM, MCPMedSAM, ModelConfig, build_litemedsam, build_mcp_medsam, variant_name

__all__ = [
    "DecoderOutput", "LiteMedSAM", "MCPMedSAM", "MODEL_CONFIGS", "MaskDecoderF4", "ModelConfig", "SamMaskDecoder",
    "build_litemedsam", "build_mcp_medsam", "variant_name",
]
