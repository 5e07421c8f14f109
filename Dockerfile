# CPU appliance for MCP-MedSAM (CVPR24 "MedSAM on Laptop" NPZ cases):
#   docker container run -m 8G --rm -v IN:/workspace/inputs -v OUT:/workspace/outputs IMAGE /bin/bash -c "sh predict.sh"
# Runtime dependencies only (no torch); the default weights (package data) and their compiled-model cache are baked in.

# Stage 1: build the package (code + weights) into a folder; only that folder reaches the image.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY export ./export
COPY weights ./weights
RUN pip install --no-cache-dir --no-deps --target /opt/mcp-medsam/lib .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/opt/mcp-medsam/lib \
    PATH=/opt/mcp-medsam/lib/bin:$PATH \
    MCP_MEDSAM_CACHE=/opt/mcp-medsam/.ov-cache

WORKDIR /opt/mcp-medsam

# Dependencies first, read from pyproject.toml: this layer is rebuilt only when that file changes,
# not when the code or the weights do.
COPY pyproject.toml /tmp/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt /tmp/pyproject.toml \
    && groupadd --system --gid 1000 user \
    && useradd --system --create-home --gid user --uid 1000 user

# The package: mcp_medsam with its weights as package data (mcp-medsam on PATH, python -m mcp_medsam).
COPY --from=build /opt/mcp-medsam/lib /opt/mcp-medsam/lib
COPY predict.sh ./

# Fill the OpenVINO cache at build time: every per-case container run then loads the compiled
# graphs instead of compiling them. Owned by the runtime user so a different CPU can add entries.
RUN python -m mcp_medsam warmup --cache-dir .ov-cache \
    && mkdir -p /workspace/inputs /workspace/outputs \
    && chown -R user:user .ov-cache /workspace

USER 1000:1000

CMD ["sh", "predict.sh"]
