"""dwc, the Deadwood compiler: an optimization compiler for large language models."""

__version__ = "0.1.0"
