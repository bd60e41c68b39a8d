"""torch.compile's work, kept across worker starts: PyTorch's own caches in one folder per machine.

Compiling SVD's UNet takes minutes the first time. Inductor's FX graph cache and AOTAutograd's cache (on disk,
under `TORCHINDUCTOR_CACHE_DIR`) and Triton's kernel cache turn a later start's compile into loads, so a
restart pays seconds. Besides them, `artifacts.bin` holds PyTorch's portable "mega-cache"
(`torch.compiler.save_cache_artifacts`): copy it to another host's cache folder and its first start is warm too.

SVDQ_COMPILE_CACHE_DIR chooses the folder (default: svdq/compile under the user's cache dir); docker-compose
mounts a volume there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ARTIFACTS = "artifacts.bin"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "svdq" / "compile"


def configure(directory: Path) -> Path:
    """Point PyTorch's compile caches at `directory` and turn them on; before the first compile."""
    import torch._functorch.config
    import torch._inductor.config

    directory.mkdir(parents=True, exist_ok=True)
    # Inductor and Triton read these when they first write or look up a cache entry, not at import.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(directory / "triton")
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return directory


def load_artifacts(directory: Path) -> bool:
    """Fill the local caches from `artifacts.bin`, if there is one; a bad file is logged and ignored."""
    import torch

    path = directory / ARTIFACTS
    if not path.is_file() or not hasattr(torch.compiler, "load_cache_artifacts"):  # PyTorch < 2.7
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # a file from another PyTorch version, or cut short: compile afresh
        log.warning("compile cache %s not loaded (%s: %s); compiling afresh", path, type(exc).__name__, exc)
        return False
    return True


def save_artifacts(directory: Path) -> int:
    """Write what this process compiled to `artifacts.bin` (atomically); returns its size in bytes."""
    import torch

    if not hasattr(torch.compiler, "save_cache_artifacts"):  # PyTorch < 2.7: the on-disk caches still work
        return 0
    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception as exc:  # the worker is warm and serving: a cache not written is only slower next time
        log.warning("compile cache artifacts not saved (%s: %s)", type(exc).__name__, exc)
        return 0
    if saved is None:
        return 0
    data, _info = saved
    path = directory / ARTIFACTS
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_bytes(data)
    partial.replace(path)
    return len(data)
