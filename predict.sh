#!/bin/sh
# Challenge entry point: `sh predict.sh` segments every case in /workspace/inputs into
# /workspace/outputs (one .npz per case, key "segs") and writes timing.csv there.
# Overridable for tests and pipelines: MCP_MEDSAM_INPUTS, MCP_MEDSAM_OUTPUTS, MCP_MEDSAM_WEIGHTS
# (default: the weights installed with mcp-medsam), MCP_MEDSAM_CACHE (OpenVINO compiled-model cache;
# the image ships it filled).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
IN=${MCP_MEDSAM_INPUTS:-/workspace/inputs}
OUT=${MCP_MEDSAM_OUTPUTS:-/workspace/outputs}
export MCP_MEDSAM_CACHE="${MCP_MEDSAM_CACHE:-$HERE/.ov-cache}"
mkdir -p "$OUT" 2>/dev/null || true
if [ ! -w "$OUT" ]; then
    echo "error: output folder $OUT is not writable by uid $(id -u); make it writable (e.g. chmod 777)" >&2
    exit 1
fi
exec python -m mcp_medsam predict -i "$IN" -o "$OUT" --cache-dir "$MCP_MEDSAM_CACHE"
