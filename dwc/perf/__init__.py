"""Performance: the cost model and its calibration, the load simulator, `dwc bench`'s
measurements and the load / soak drivers."""
