"""Device presets: what a TensorRT build and the memory planner need to know about a target.

The figures are the devices' nominal memory; `reserved_gib` is what the OS, the CUDA context and
the TensorRT / cuDNN libraries keep (on Jetson, CPU and GPU share the one LPDDR5 pool, so the OS
counts against the model). The reserves, workspaces, context caps and optimization levels are
starting points chosen here, not measured on the devices: override them with a preset of your own.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

GIB = 1 << 30


@dataclass(frozen=True)
class DevicePreset:
    name: str
    summary: str
    memory_gib: float  # total memory the GPU can use (unified on Jetson)
    reserved_gib: float  # OS + CUDA context + TensorRT libraries
    workspace_gib: float  # TensorRT builder workspace (tactic scratch) limit, also held at run time
    max_context: int  # KV-cache length the engines are built for (capped by the model's own)
    builder_optimization_level: int  # TensorRT 0..5: higher = longer builds, maybe faster engines
    unified_memory: bool = True

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def reserved_bytes(self) -> int:
        return int(self.reserved_gib * GIB)

    @property
    def workspace_bytes(self) -> int:
        return int(self.workspace_gib * GIB)


PRESETS: dict[str, DevicePreset] = {p.name: p for p in (
    DevicePreset("orin-nano", "Jetson Orin Nano 8 GB", 8, 1.5, 0.5, 2048, 3),
    DevicePreset("orin-nx", "Jetson Orin NX 16 GB", 16, 2.0, 1.0, 4096, 3),
    DevicePreset("agx-orin-32", "Jetson AGX Orin 32 GB", 32, 3.0, 2.0, 4096, 4),
    DevicePreset("agx-orin", "Jetson AGX Orin 64 GB", 64, 4.0, 4.0, 4096, 4),
    DevicePreset("thor", "Jetson AGX Thor 128 GB", 128, 6.0, 8.0, 8192, 5),
    DevicePreset("rtx", "RTX desktop GPU, 24 GB (e.g. RTX 4090)", 24, 1.0, 4.0, 4096, 5, unified_memory=False),
)}


def get_preset(name: str) -> DevicePreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown device '{name}'; choose one of: {', '.join(PRESETS)}") from None
