# The svdq image (workers, and Flower in docker-compose.yml): the Python and package versions CI tests.
# torch comes from the package index at the version in constraints.txt; on Linux that is its CUDA build, which
# carries the CUDA runtime and cuDNN as wheels. The host brings only the driver (NVIDIA Container Toolkit).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch.compile's GPU backend (Triton) builds small C helpers when a worker first compiles: it needs a compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN pip install -c constraints.txt torch \
    && pip install -c constraints.txt ".[worker,flower,gateway]"

# Celery warns against running as root, and a render needs no privileges. Named volumes mount over these
# folders and take their owner, so the image's user can write the model cache, compile cache and spool.
RUN useradd --create-home --uid 1000 svdq \
    && mkdir -p /home/svdq/.cache/huggingface /home/svdq/.cache/svdq/compile /var/lib/svdq/spool \
    && chown -R svdq:svdq /home/svdq /var/lib/svdq
USER svdq
ENV HF_HOME=/home/svdq/.cache/huggingface \
    SVDQ_COMPILE_CACHE_DIR=/home/svdq/.cache/svdq/compile \
    SVDQ_SPOOL_DIR=/var/lib/svdq/spool
CMD ["svdq", "worker"]
