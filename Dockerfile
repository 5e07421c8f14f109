# CPU appliance for MCP-MedSAM (CVPR24 "MedSAM on Laptop" NPZ cases):
#   docker container run -m 8G --rm -v IN:/workspace/inputs -v OUT:/workspace/outputs IMAGE /bin/bash -c "sh predict.sh"
# The same image serves the model over HTTP (web page at /; a token is required off loopback):
#   docker container run --rm -p 8000:8000 -e MCP_MEDSAM_TOKEN=<16+ characters> IMAGE mcp-medsam serve --host 0.0.0.0
# Runtime dependencies only (no torch); the default weights (package data) and their compiled-model cache are baked in.
#
# Size: pip runs in build stages; the image is Debian with its python3 (no pip, setuptools or build tools)
# and the installed folders. What a CPU-only OpenVINO IR runtime never loads is left out of the
# dependencies: the GPU and NPU plugins, every model frontend but IR's, the C API, the C++ headers, the
# GPU kernel cache and the benchmark tool (about 90 MB), and numpy's tests, f2py and distutils. The
# compiled-model cache holds no weights (OpenVINO's weightless cache: they are read from the IR files).

# Stage 1: the dependencies (the runtime's and the serve extra's, read from pyproject.toml), into a folder.
# Rebuilt only when pyproject.toml changes, not when the code or the weights do.
FROM python:3.11-slim-bookworm AS deps
COPY pyproject.toml /tmp/
WORKDIR /opt/mcp-medsam/deps
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['serve']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir --target /opt/mcp-medsam/deps -r /tmp/requirements.txt \
    && rm -rf bin openvino/include openvino/libs/cache.json openvino/libs/libopenvino_c.so* \
        openvino/libs/libopenvino_intel_gpu_plugin.so openvino/libs/libopenvino_intel_npu_plugin.so \
        openvino/frontend/jax openvino/frontend/onnx openvino/frontend/paddle openvino/frontend/pytorch \
        openvino/frontend/tensorflow openvino/tools/benchmark numpy/f2py numpy/distutils \
    && find openvino/libs -name "libopenvino_*_frontend.so*" ! -name "libopenvino_ir_frontend.so*" -delete \
    && find numpy -depth -type d -name tests -exec rm -rf {} +

# Stage 2: the package (code + weights as package data) into a folder.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY export ./export
COPY weights ./weights
RUN pip install --no-cache-dir --no-deps --target /opt/mcp-medsam/lib . \
    && sed -i '1s|^#!.*$|#!/usr/bin/python3|' /opt/mcp-medsam/lib/bin/mcp-medsam

FROM debian:bookworm-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/opt/mcp-medsam/lib:/opt/mcp-medsam/deps \
    PATH=/opt/mcp-medsam/lib/bin:$PATH \
    MCP_MEDSAM_CACHE=/opt/mcp-medsam/.ov-cache

# Debian's Python 3.11 (the build stages' Python; wheels and compiled bytecode fit it) and the runtime user.
# No documentation, manual pages or translations from the packages; apt's lists and caches removed.
# hadolint ignore=DL3008
RUN printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\n' \
        > /etc/dpkg/dpkg.cfg.d/excludes \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python-is-python3 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    && groupadd --system --gid 1000 user \
    && useradd --system --create-home --gid user --uid 1000 user

WORKDIR /opt/mcp-medsam

# Dependencies before the code: this layer stays cached while the code or the weights change.
COPY --from=deps /opt/mcp-medsam/deps /opt/mcp-medsam/deps
# The package: mcp_medsam with its weights as package data (mcp-medsam on PATH, python -m mcp_medsam).
COPY --from=build /opt/mcp-medsam/lib /opt/mcp-medsam/lib
COPY predict.sh ./

# Fill the OpenVINO cache at build time for the precision runs choose on this CPU (--precision auto):
# every per-case container run then loads the compiled graphs instead of compiling them. Owned by the
# runtime user so a different CPU can add entries.
RUN python -m mcp_medsam warmup --cache-dir .ov-cache \
    && mkdir -p /workspace/inputs /workspace/outputs \
    && chown -R user:user .ov-cache /workspace

USER 1000:1000

EXPOSE 8000
CMD ["sh", "predict.sh"]
