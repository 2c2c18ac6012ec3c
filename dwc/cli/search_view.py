"""The search table of a bundle built with `--target auto | <hardware>` (docs/SEARCH.md):
`dwc inspect` shows it, `dwc diff` shows two side by side."""

from __future__ import annotations

import click

# The figures of a candidate shown side by side: (key, column heading).
SIDE_BY_SIDE = (("status", "status"), ("delta_pct", "ppl +%"),
                ("usd_per_million_output_tokens", "$/M tok"), ("max_rps", "max rps"),
                ("tpot_p99_ms", "p99 TPOT"))


def side_by_side(a: dict, b: dict) -> list[dict] | None:
    """One row per target in either search: A's and B's figures; None unless both
    bundles have a search."""
    if not a.get("search") or not b.get("search"):
        return None
    rows_a = {r["target"]: r for r in a["search"]["candidates"]}
    rows_b = {r["target"]: r for r in b["search"]["candidates"]}
    names = list(rows_a) + [n for n in rows_b if n not in rows_a]
    return [{"target": n, "a": _pick(rows_a.get(n)), "b": _pick(rows_b.get(n))} for n in names]


def _pick(r: dict | None) -> dict | None:
    return None if r is None else {k: r.get(k) for k, _ in SIDE_BY_SIDE}


def echo_side_by_side(rows: list[dict]) -> None:
    heads = "  ".join(f"{h:>9}" for _, h in SIDE_BY_SIDE)
    click.echo(f"  search {'':<20}A: {heads}   B: {heads}")
    for r in rows:
        click.echo(f"  {r['target']:<27}{_cells(r['a'])}      {_cells(r['b'])}")


def echo_table(search: dict) -> None:
    click.echo(f"search: winner {search['winner']} ({search['rule']})")
    for r in search["candidates"]:
        click.echo(f"  {r['target']:<22}{_cells(_pick(r))}  {r['why'] or ''}")


def _cells(r: dict | None) -> str:
    if r is None:
        return "  ".join(f"{'-':>9}" for _ in SIDE_BY_SIDE)
    return "  ".join(f"{_fmt(r[k]):>9}" for k, _ in SIDE_BY_SIDE)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
