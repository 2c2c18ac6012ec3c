"""The serving backends, registered once: a target's `backend:` names one of them.

Each lives in its own folder behind the interface of dwc/backends/base.py; the rest of
dwc reaches a backend only through `get` (tests/test_backends.py checks it).
"""

from __future__ import annotations

from dwc.backends.base import Backend
from dwc.backends.gguf import GGUF
from dwc.backends.tensorrt_llm import TENSORRT_LLM
from dwc.backends.torch_triton import TORCH_TRITON

BACKENDS: dict[str, Backend] = {b.name: b for b in (TORCH_TRITON, GGUF, TENSORRT_LLM)}


def get(name: str) -> Backend:
    return BACKENDS[name]
