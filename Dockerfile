# grokserve runtime image: the chart's default image (ghcr.io/grokserve/grokserve).
# CUDA runtime base; grokserve with a CUDA build of torch; runs as an unprivileged user.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

LABEL org.opencontainers.image.source="https://github.com/grokserve/grokserve" \
      org.opencontainers.image.title="grokserve" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/grokserve PATH=/opt/grokserve/bin:$PATH \
    RAY_USAGE_STATS_ENABLED=0 HOME=/tmp

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY . /src
RUN python3 -m venv "$VIRTUAL_ENV" \
 && pip install "torch>=2.4,<3" --index-url https://download.pytorch.org/whl/cu128 \
 && pip install /src \
 && rm -rf /src

RUN groupadd --gid 1000 grokserve && useradd --uid 1000 --gid 1000 --no-create-home grokserve
USER 1000:1000
WORKDIR /tmp
EXPOSE 50051 8265 6379 10001 9464 9470
CMD ["grokserve", "--help"]
