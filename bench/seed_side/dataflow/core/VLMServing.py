# From OpenDCAI/DataFlow-MM at a5d48e00d5f28952a9438803238a97870f90b772, dataflow/core/VLMServing.py (Apache License 2.0, see
# bench/seed_side/LICENSE). Unchanged.
from .LLMServing import LLMServingABC
from abc import ABC, abstractmethod
from typing import Any, List
class VLMServingABC(LLMServingABC):
    """Abstract base class for VLM serving. Which may be used to generate data from a model or API. Called by operators
    """
    pass