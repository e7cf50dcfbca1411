"""Device presets, the memory planner and TensorRT optimization profiles: pure Python, no TensorRT.

Used by `tops-export --device X [--dry-run]` (before any export work) and by `tops-build` (before
any engine is built), so both refuse a model that cannot fit the device with the same one line.
"""

from .devices import PRESETS, DevicePreset, get_preset
from .footprint import Footprint, footprint_of
from .memory import PLAN_PRECISIONS, MemoryPlan, check_fits, format_plan, plan_memory

__all__ = ["PRESETS", "DevicePreset", "get_preset", "Footprint", "footprint_of", "PLAN_PRECISIONS", "MemoryPlan",
           "check_fits", "format_plan", "plan_memory"]
