"""Jinja2 templates for bundle files (installed as dwc.templates)."""
