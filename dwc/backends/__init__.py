"""Backend emitters: each writes a bundle's model/ (and serve/) in its backend's layout."""

from dwc.backends import gguf, tensorrt_llm, torch_triton

# Each takes (BundleWriter, build context) and writes model/ (and serve/) for its backend.
EMITTERS = {"torch-triton": torch_triton.emit, "gguf": gguf.emit,
            "tensorrt-llm": tensorrt_llm.emit}
