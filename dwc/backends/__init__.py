"""Backend emitters: each writes a bundle's model/ (and serve/) in its backend's layout."""

from dwc.backends import gguf, torch_triton

EMITTERS = {"torch-triton": torch_triton.emit, "gguf": gguf.emit}
