"""Rendering the jinja2 templates under templates/ (installed as dwc.templates)."""

from __future__ import annotations

from importlib import resources

import jinja2


def _source(name: str):
    text = resources.files("dwc.templates").joinpath(name).read_text(encoding="utf-8")
    return text, None, lambda: True


_ENV = jinja2.Environment(loader=jinja2.FunctionLoader(_source), undefined=jinja2.StrictUndefined,
                          keep_trailing_newline=True, autoescape=False)


def render(name: str, **values) -> str:
    return _ENV.get_template(name).render(**values)
