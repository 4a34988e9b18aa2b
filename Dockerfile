# lstm-serve image: the server (and the training job) in a venv, run as a non-root user.
# Legacy-builder compatible (no BuildKit syntax).
#   CPU (default):  docker build -t lstm-serve .
#   CUDA:           docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#                                --build-arg EXTRAS=gpu -t lstm-serve:cuda .
# Wheels in wheels/ win over the indexes (the offline test puts the local CPU torch wheel there).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=server
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip
COPY wheels/ /wheels/
# torch first: a local wheel if one was provided, else the CPU-only (or CUDA) index.
RUN if ls /wheels/torch-*.whl >/dev/null 2>&1; then \
        /opt/venv/bin/pip install --find-links /wheels /wheels/torch-*.whl; \
    else \
        /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.11"; \
    fi
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY client /src/client
RUN /opt/venv/bin/pip install --find-links /wheels "/src[${EXTRAS}]"

FROM ${BASE_IMAGE}
RUN useradd --create-home --uid 10001 lstm && mkdir -p /models /state && chown lstm:lstm /models /state
COPY --from=build /opt/venv /opt/venv
COPY models/default.safetensors /app/models/default.safetensors
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LSTM_SERVE_MODELS_DIR=/app/models \
    LSTM_SERVE_HOST=0.0.0.0 \
    LSTM_SERVE_PORT=50051 \
    LSTM_SERVE_METRICS_PORT=8000
WORKDIR /app
USER lstm
EXPOSE 50051 8000
HEALTHCHECK --interval=5s --timeout=5s --start-period=120s --retries=3 \
    CMD ["lstm-client", "--target", "127.0.0.1:50051", "--timeout", "4", "health"]
ENTRYPOINT ["lstm-serve"]
CMD ["serve"]
