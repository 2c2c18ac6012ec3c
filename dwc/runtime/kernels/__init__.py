"""The Triton kernels of the GPU path (and the measured tile tables they read), each
tested against a PyTorch reference in tests/test_gpu.py; layers/ calls them."""
