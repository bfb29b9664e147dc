"""What every benchmark reports the same way: the device it ran on, and its JSON output."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def device_info(device: torch.device) -> dict:
    """The GPU's name, or the CPU's model, thread count and how busy the machine was at the start
    (another process on the same cores slows everything, so a reader needs to know)."""
    if device.type == "cuda":
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "count": torch.cuda.device_count(),
        }
    name = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        name = names[0] if names else name
    return {
        "type": device.type,
        "name": name,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def emit(results: dict, output: str | None) -> dict:
    """Print the results as JSON on stdout, and also write them to `output` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return results
