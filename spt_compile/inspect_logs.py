"""`SPT_LOGS`: our own logging switch (an unknown name in TORCH_LOGS makes `import torch` fail).

    SPT_LOGS=info              the report of every compiled graph (logger "spt_compile" at INFO)
    SPT_LOGS=rewrites          the same, with the estimated savings of the graph
    SPT_LOGS=rewrites,graphs   also the code of each graph before and after, rewritten nodes marked
    SPT_LOGS=debug             everything at DEBUG

Tokens are comma-separated, case-insensitive; an unknown token is reported once (with the valid ones) and
ignored, so a typo never breaks a compile.
"""
from __future__ import annotations

import logging
import os

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
TOPICS = ("rewrites", "graphs")


def tokens(value: str | None = None) -> list[str]:
    value = os.environ.get("SPT_LOGS", "") if value is None else value
    return [t.strip().lower() for t in value.split(",") if t.strip()]


def configure(log: logging.Logger, value: str | None = None) -> None:
    """Set up `log` from SPT_LOGS (called once when the backend is imported)."""
    toks = tokens(value)
    if not toks:
        return
    logging.basicConfig()
    levels = [LEVELS[t] for t in toks if t in LEVELS]
    log.setLevel(min(levels) if levels else logging.INFO)
    unknown = [t for t in toks if t not in LEVELS and t not in TOPICS]
    if unknown:
        log.warning("SPT_LOGS: unknown %s %s ignored; valid: %s", "entry" if len(unknown) == 1 else "entries",
                    ", ".join(map(repr, unknown)), ", ".join(list(LEVELS) + list(TOPICS)))


def log_compile(log: logging.Logger, report, value: str | None = None) -> None:
    """Log one compiled graph's report as it is compiled (what SPT_LOGS asks for)."""
    if not log.isEnabledFor(logging.INFO):
        return
    toks = tokens(value)
    text = str(report)
    if "rewrites" in toks or "graphs" in toks:
        text += "\n" + savings_text(report)
    if "graphs" in toks:
        text += "\n" + listings_text(report)
    log.info("%s", text)


def savings_text(report) -> str:
    """The estimated totals as a small table (dense vs spt at the traced sizes; spt_compile/savings.py)."""
    from spt_compile.html_report import report_savings
    from spt_compile.savings import human

    _, totals = report_savings(report)
    if not totals:
        return "estimated savings: none (no site rewritten)"
    rows = [(t["quantity"], human(t["dense"], t["unit"]), human(t["spt"], t["unit"]),
             "-" if t["ratio"] is None else f"{t['ratio']:.3f}") for t in totals]
    headers = ("estimated savings (dense -> spt)", "dense", "spt", "spt / dense")
    widths = [max(len(r[c]) for r in rows + [headers]) for c in range(4)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def listings_text(report) -> str:
    from spt_compile.html_report import graph_listings

    out = []
    for g, before, after in graph_listings(report):
        for title, rows in (("before", before), ("after", after)):
            out.append(f"--- graph {g.index} {title} the rewrite ---")
            out += [f"{mark} {text}" + (f"   <- {label}" if label else "") for mark, label, text in rows]
    return "\n".join(out)
