# The svdq worker image: CUDA PyTorch from the base image, svdq and diffusers on top.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
# torch is already in the image and satisfies the worker extra's `torch>=2.1`.
RUN pip install ".[worker]"

# Celery warns against running as root, and a render needs no privileges.
RUN useradd --create-home svdq
USER svdq
# Volumes mount here (docker-compose.yml): made by the image's user, so they are writable by it.
RUN mkdir -p /home/svdq/.cache/huggingface /home/svdq/.cache/svdq/compile
CMD ["svdq", "worker"]
