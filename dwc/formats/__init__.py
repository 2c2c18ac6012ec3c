"""Format constants, one module per format (key names, file names, tensor names)."""
