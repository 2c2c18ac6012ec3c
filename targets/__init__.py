"""Target definitions: one YAML file per target, read by `dwc.target` (installed as dwc.targets)."""
