# The embedding server on CPU: KServe V1/V2 REST on $PORT (8080; Render sets 10000), gRPC on $GRPC_PORT (8081).
# Build: docker build -t minilm-embedding-server .                    (the default target: python model.py)
#        docker build --target ray -t minilm-embedding-server:ray .   (adds Ray Serve and BACKEND=onnx)
# Run:   docker run -p 8080:8080 -e API_KEY=your-secret-key minilm-embedding-server
#
# deps installs the CPU build of torch and requirements.txt into a virtualenv; build copies the app, installs it
# into that virtualenv as an editable project (so Ray's workers import it from /app wherever they start), converts
# the model for OpenVINO into $CACHE_DIR, so that a start needs no network and no conversion. The default target
# carries only that virtualenv (with the bundled model), the converted model and the app. The ray target adds one
# layer: what requirements-ray.txt installs on top (Ray Serve, ONNX Runtime), and one more with the ONNX export.
# Build arguments: PYTHON_IMAGE (the base image) and TORCH_FIND_LINKS (a folder of wheels, e.g. a mounted
# /wheels, to take torch from instead of PyTorch's CPU index).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS deps
ARG TORCH_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY requirements.txt constraints.txt /tmp/
# torch first, CPU build only: requirements.txt pins the same version, which this already satisfies, so pip never
# fetches the PyPI wheel that pulls the CUDA libraries (nvidia-*, triton); from a wheel folder, torch alone (its
# dependencies come from the index with requirements.txt). constraints.txt holds every other package at the version
# the tests ran with. No bytecode yet (a third of the size): the build stage compiles what the server imports. Then
# drop what the server never loads: C++ headers, static libraries, test suites and binaries, OpenVINO's GPU and NPU
# plugins and the frontends of formats it never reads.
RUN if [ -n "$TORCH_FIND_LINKS" ]; then \
        pip install --no-cache-dir --no-compile --no-index --no-deps --find-links "$TORCH_FIND_LINKS" torch==2.13.0; \
    else \
        pip install --no-cache-dir --no-compile --index-url https://download.pytorch.org/whl/cpu torch==2.13.0; \
    fi \
    && pip install --no-cache-dir --no-compile -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && python -c "import sys, torch, importlib.metadata as md; cuda = sorted(d.metadata['Name'] for d in md.distributions() if d.metadata['Name'].lower().startswith(('nvidia-', 'triton'))); sys.exit(f'CUDA packages in a CPU image: {cuda}' if cuda or torch.version.cuda else 0)" \
    && site=/opt/venv/lib/python3.11/site-packages \
    && rm -rf "$site/torch/include" "$site/torch/test" "$site"/torch/bin/test_* "$site"/torch/bin/*Test \
        "$site"/torch/bin/protoc* "$site/openvino/include" "$site"/openvino/libs/libopenvino_intel_[gn]pu_plugin.so \
        "$site"/openvino/libs/libopenvino_gguf_frontend.so* "$site"/openvino/libs/libopenvino_jax_frontend.so* \
        "$site"/openvino/libs/libopenvino_onnx_frontend.so* "$site"/openvino/libs/libopenvino_paddle_frontend.so* \
        "$site"/openvino/libs/libopenvino_tensorflow*_frontend.so* \
    && find /opt/venv -depth -type d -name tests -exec rm -rf {} + \
    && find /opt/venv -name '*.a' -delete

# requirements-ray.txt over the same virtualenv; /opt/extras keeps only the files it added, so that the ray
# target is the default image plus one layer. It fails if it would change a package the default image has.
FROM deps AS deps-ray
COPY requirements.txt requirements-ray.txt constraints.txt /tmp/
RUN pip freeze --all > /tmp/before.txt \
    && touch /tmp/marker \
    && pip install --no-cache-dir -r /tmp/requirements-ray.txt -c /tmp/constraints.txt \
    && pip freeze --all > /tmp/after.txt \
    && python -c "import sys; old, new = (set(open(f'/tmp/{n}.txt')) for n in ('before', 'after')); sys.exit(f'requirements-ray.txt changed {sorted(old - new)}' if old - new else 0)" \
    && find /opt/venv -depth -type d -name tests -exec rm -rf {} + \
    && mkdir /opt/extras \
    && find /opt/venv -cnewer /tmp/marker ! -type d -exec cp -a --parents -t /opt/extras {} +

FROM deps AS build
WORKDIR /app
COPY . /app
ENV HF_HUB_OFFLINE=1 \
    CACHE_DIR=/opt/cache
# Bytecode for the modules a start imports (the server and OpenVINO; not torch, which only the conversion and the
# fallback backend load), so that starts on a read-only root do not compile them; the rest compiles in memory.
RUN pip install --no-cache-dir --no-deps --no-build-isolation --editable /app \
    && python -m embedding_server.engine.export_cache --prebuild --backend openvino \
    && python -c "import os, py_compile, sys, model, embedding_server.server, openvino; [py_compile.compile(f, doraise=True) for f in {getattr(m, '__file__', None) or '' for m in list(sys.modules.values())} if f.endswith('.py') and os.path.isfile(f)]" \
    && python -m compileall -q /app

FROM deps-ray AS build-ray
WORKDIR /app
COPY . /app
ENV HF_HUB_OFFLINE=1 \
    CACHE_DIR=/opt/cache
RUN python -m embedding_server.engine.export_cache --prebuild --backend onnx

FROM ${PYTHON_IMAGE} AS server
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

# `--target ray`: the same server, plus `python ray_serve.py` and the KubeRay head and workers (k8s/rayservice.yaml).
FROM server AS ray
COPY --from=build-ray /opt/extras/opt/venv /opt/venv
COPY --from=build-ray /opt/cache /opt/cache

# The default target (the last stage, so that a plain `docker build .` and Render make it).
FROM server AS runtime
