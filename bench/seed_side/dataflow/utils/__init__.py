# From OpenDCAI/DataFlow-MM at a5d48e00d5f28952a9438803238a97870f90b772, dataflow/utils/__init__.py (Apache License 2.0, see
# bench/seed_side/LICENSE). Unchanged.
from .registry import OPERATOR_REGISTRY, IO_REGISTRY
__all__ = [
    'IO_REGISTRY',
    'OPERATOR_REGISTRY',
]
