"""The bundle: written atomically by the compiler wing, read and verified by everything."""
