"""The GPU side: a Celery worker that renders jobs (see README's file map). Importing the package does one thing,
before its entry points (`python -m worker`, `worker.tiny_model`, `svdq bench`) import diffusers: it stops one
piece of advice from transformers (below). A script that imports diffusers first still prints it."""

import logging


class _NoTorchvisionAdvice(logging.Filter):
    """Drops transformers' advice to install torchvision, given where it falls back to CLIP's PIL image processor
    (as diffusers' import of the SVD pipeline makes it do). The fallback is sound: SVD's pipeline resizes the image
    itself and has the processor only normalize. The advice is not: an unpinned `pip install torchvision` pulls a
    CUDA build of gigabytes and may replace the torch it was meant to fit. Every worker and `svdq make-tiny-model`
    printed it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionAdvice())
