"""Inference engine: RLE, model metadata, the inspection graph, and the backends that run it.

Importing ``engine`` is cheap: torch, onnxruntime and tensorrt load only with the backend that
needs them.
"""

from __future__ import annotations

from engine.backends import Backend, BackendUnavailable, InspectionResult, load_backend
from engine.metadata import ModelMetadata

__all__ = ["Backend", "BackendUnavailable", "InspectionResult", "ModelMetadata", "load_backend"]
