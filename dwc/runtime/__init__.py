"""The torch-triton serving runtime (DESIGN.md §6): bundle reader -> engine -> scheduler,
block manager, model runner -> layers -> kernels. It never imports a pass or the pipeline.
"""
