# The embedding server on CPU: KServe V1/V2 REST on $PORT (8080; Render sets 10000), gRPC on $GRPC_PORT (8081).
# Build: docker build -t minilm-embedding-server .
# Run:   docker run -p 8080:8080 -e API_KEY=your-secret-key minilm-embedding-server
#
# Stage 1 installs the CPU build of torch and the requirements into a virtualenv, copies the app and converts
# the model for the fast backends (ONNX / OpenVINO) into $CACHE_DIR, so that a start needs no network and no
# conversion. Stage 2 carries only the virtualenv (with the bundled model), the converted model and the app.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
# torch first, from PyTorch's CPU-only index: requirements.txt pins the same version, which this already
# satisfies, so pip never fetches the PyPI wheel that pulls the CUDA libraries (nvidia-*, triton).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && python -c "import sys, torch, importlib.metadata as md; cuda = sorted(d.metadata['Name'] for d in md.distributions() if d.metadata['Name'].lower().startswith(('nvidia-', 'triton'))); sys.exit(f'CUDA packages in a CPU image: {cuda}' if cuda or torch.version.cuda else 0)"
WORKDIR /app
COPY . /app
ENV HF_HUB_OFFLINE=1 \
    CACHE_DIR=/opt/cache
RUN python backends.py --prebuild \
    && python -m compileall -q /app

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    CACHE_DIR=/opt/cache \
    PORT=8080 \
    GRPC_PORT=8081
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/cache /opt/cache
COPY --from=build /app /app
WORKDIR /app
USER 10001:10001
EXPOSE 8080 8081
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/health', timeout=4)"]
CMD ["python", "model.py"]
