"""The torch device a `--device` choice (auto, cpu, cuda) names, for the server and the training job alike.

`auto` takes CUDA when it is available and the CPU otherwise; `cuda` without CUDA is an error
rather than a silent fall-back to the CPU.
"""

from __future__ import annotations

import torch


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available")
    return torch.device(
        "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"
    )
