# CPU appliance for MCP-MedSAM (CVPR24 "MedSAM on Laptop" NPZ cases):
#   docker container run -m 8G --rm -v IN:/workspace/inputs -v OUT:/workspace/outputs IMAGE /bin/bash -c "sh predict.sh"
# Runtime dependencies only (no torch); the default weights and their compiled-model cache are baked in.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MCP_MEDSAM_WEIGHTS=/opt/mcp-medsam/weights \
    MCP_MEDSAM_CACHE=/opt/mcp-medsam/.ov-cache

WORKDIR /opt/mcp-medsam

# Dependencies first: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install --no-cache-dir . \
    && groupadd --system --gid 1000 user \
    && useradd --system --create-home --gid user --uid 1000 user

COPY weights ./weights
COPY predict.sh ./

# Fill the OpenVINO cache at build time: every per-case container run then loads the compiled
# graphs instead of compiling them. Owned by the runtime user so a different CPU can add entries.
RUN python -m app.cli warmup --weights weights --cache-dir .ov-cache \
    && mkdir -p /workspace/inputs /workspace/outputs \
    && chown -R user:user .ov-cache /workspace

USER 1000:1000

CMD ["sh", "predict.sh"]
