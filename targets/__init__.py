"""Target definitions: one YAML file per target, read by `dwc.compiler.target` (installed as dwc.targets)."""
