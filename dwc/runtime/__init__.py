"""The torch-triton serving runtime (README.md, "The runtime"; docs/RUNTIME.md): bundle
reader -> engine -> scheduler, block manager, model runner -> layers -> kernels. It
never imports a pass or the pipeline."""
