"""``--device`` and ``--dtype`` checks shared by every command, done before anything loads.

A missing CUDA device should cost one line, not a model load followed by a driver
traceback; fp16 on a CPU works badly or not at all, so it earns a one-line warning.
"""

from __future__ import annotations

import sys

__all__ = ["resolve_device", "warn_if_half_on_cpu"]

NO_CUDA = "CUDA is not available on this machine; use --device cpu"


def resolve_device(name: str | None) -> str:
    """The device to run on: ``name`` checked, or ``"cuda"`` when available else ``"cpu"``.

    Raises :class:`ValueError` (one line) for a CUDA device this machine does not have, a
    device index out of range, or a name torch does not know.
    """
    import torch

    if name is None or name == "":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(NO_CUDA)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: wadi runs on cpu, cuda or mps")
    return str(device)


def warn_if_half_on_cpu(device: str, dtype, command: str = "wadi") -> bool:
    """Print one warning line when ``dtype`` is fp16 and ``device`` is a CPU; True if warned."""
    import torch

    if dtype in (torch.float16, "fp16", "float16") and str(device).startswith("cpu"):
        print(
            f"{command}: warning: fp16 on CPU is slow and some layers do not support it; "
            "use --dtype fp32 (or bf16) on CPU",
            file=sys.stderr,
        )
        return True
    return False
