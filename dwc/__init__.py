"""dwc, the Deadwood compiler: an optimization compiler for large language models."""

__version__ = "0.1.0"


def __getattr__(name):
    # `from dwc import InferenceServer` without importing torch for every `import dwc`.
    if name == "InferenceServer":
        from dwc.server import InferenceServer

        return InferenceServer
    raise AttributeError(f"module 'dwc' has no attribute {name!r}")
