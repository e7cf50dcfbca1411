"""What machine a benchmark ran on, and the process's peak memory per budget."""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import sys
from importlib import metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def jetson_power_mode() -> str | None:
    """`nvpmodel -q` on a Jetson (e.g. "NV Power Mode: MAXN"); None where the tool is absent or fails."""
    exe = shutil.which("nvpmodel")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def gpu_name(providers=()) -> str | None:
    """The CUDA device's name: from torch when it is loaded (or ORT has CUDA), else `nvidia-smi`; None
    on a machine without one. torch is not imported just to find out there is no GPU."""
    try:
        if "torch" in sys.modules or "CUDAExecutionProvider" in providers:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        exe = shutil.which("nvidia-smi")
        if exe:
            out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            names = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
            return names[0] if out.returncode == 0 and names else None
    except Exception:
        pass
    return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("tops-edge", "onnxruntime", "onnxruntime-gpu", "numpy", "torch", "transformers", "onnx"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            if pkg != "onnxruntime-gpu":
                out[pkg] = None
    return out


def device_info(pipe) -> dict:
    """Host, runtime and export facts for the report (see report.SCHEMA["device"])."""
    import onnxruntime as ort

    backend = pipe.backend
    options = getattr(backend, "options", None)
    threads = int(options.intra_op_num_threads) if options is not None else 0
    model = pipe.manifest.get("model", {})
    return {
        "cpu": cpu_model(),
        "logical_cores": int(os.cpu_count() or 0),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        # 0 = ORT's default (one thread per physical core)
        "ort_intra_op_threads": threads,
        "ort_providers": list(getattr(backend, "providers", [])),
        "ort_available_providers": list(ort.get_available_providers()),
        "gpu": gpu_name(ort.get_available_providers()),
        "jetson_power_mode": jetson_power_mode(),
        "versions": versions(),
        "model_source": str(model.get("source")),
        "selector": str(pipe.selector_method),
        "positions": str(pipe.positions),
        "rss_method": PeakMemory.method(),
    }


class PeakMemory:
    """Peak resident memory of this process over a span of work.

    On Linux the high-water mark VmHWM is reset by writing "5" to /proc/self/clear_refs and read back
    from /proc/self/status, so each budget gets its own peak. Elsewhere (or where clear_refs is not
    writable) it falls back to getrusage's ru_maxrss: the peak of the whole process so far, never reset,
    and the report's `rss_method` says so. GPU memory is torch's peak allocation, only when CUDA is
    available (ORT's CUDA arena is not visible there)."""

    _method: str | None = None

    @classmethod
    def method(cls) -> str:
        if cls._method is None:
            cls._method = "VmHWM, reset per budget" if cls._reset_hwm() and cls._vm_hwm() is not None else \
                "ru_maxrss (process peak so far, not reset per budget)"
        return cls._method

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _vm_hwm() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def __enter__(self) -> "PeakMemory":
        self.rss_bytes: int | None = None
        self.gpu_bytes: int | None = None
        self._hwm = self.method().startswith("VmHWM") and self._reset_hwm()
        self._torch = _cuda_torch()
        if self._torch is not None:
            self._torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        rss = self._vm_hwm() if self._hwm else None
        if rss is None:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss = kib if sys.platform == "darwin" else kib * 1024  # macOS reports bytes
        self.rss_bytes = int(rss)
        if self._torch is not None:
            self.gpu_bytes = int(self._torch.cuda.max_memory_allocated())


def _cuda_torch():
    if "torch" not in sys.modules:  # never import torch just to learn there is no GPU
        return None
    torch = sys.modules["torch"]
    try:
        return torch if torch.cuda.is_available() else None
    except Exception:
        return None
