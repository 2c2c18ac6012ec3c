"""Layers of the runtime's decoder; kernels live next to the layer that calls them."""
