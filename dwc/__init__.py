"""dwc, the Deadwood compiler: an optimization compiler for large language models."""

from dwc.constants import VERSION as __version__  # noqa: F401


def __getattr__(name):
    # `from dwc import InferenceServer` without importing torch for every `import dwc`.
    if name == "InferenceServer":
        from dwc.serving.server import InferenceServer

        return InferenceServer
    raise AttributeError(f"module 'dwc' has no attribute {name!r}")
