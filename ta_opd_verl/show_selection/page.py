"""The selection page: one HTML file with inline CSS (`page.css`) and JavaScript (`page.js`), the data as
JSON in the page, and a Content-Security-Policy that allows inline style and script and nothing else, so
the page makes no network request. The step table is HTML written here; the samples are drawn by
`page.js` from the data (token texts only through ``textContent``)."""

from __future__ import annotations

import html
import json
from importlib import resources

from ta_opd_verl.show_selection.steps import STATISTICS

# Nothing but the page's own inline style and script: no fetch, image, font or frame from anywhere.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
# The class page.js gives a selected position's element.
SELECTED_CLASS = "sel"
DATA_ELEMENT_ID = "selection-data"
SORT_ORDERS = {
    "dump": "dump order (stable id)",
    "kept-desc": "selected count, most first",
    "kept-asc": "selected count, fewest first",
}


def embedded_json(data: dict) -> str:
    """``data`` as JSON that cannot end its ``<script>`` element or open a comment: ``<``, ``>`` and ``&``
    as \\u escapes (JSON.parse reads them back as the characters)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _number(value: float | None) -> str:
    return "\u2014" if value is None else f"{value:.4g}"


def summary_row(summary: dict) -> str:
    """One step's row of the table at the top of the page."""
    cells = [
        ("step", str(summary["step"])),
        ("selector", summary["selector"]),
        ("ratio", f"{summary['ratio']:g}"),
        ("kept", f"{summary['kept_positions']} / {summary['valid_positions']}"),
        ("kept-fraction", f"{summary['kept_fraction']:.4f}"),
    ]
    for name in STATISTICS:
        values = summary["quantiles"].get(name)
        cells.append((f"quantiles-{name}", " \u00b7 ".join(map(_number, values)) if values else "\u2014"))
    cells.append(("samples", str(summary["samples"])))
    rules = " \u00b7 ".join(f"{key}={value}" for key, value in summary["rules"].items())
    cells.append(("rules", rules))
    body = "".join(f'<td class="{name}">{html.escape(text)}</td>' for name, text in cells)
    return f'<tr data-step="{int(summary["step"])}">{body}</tr>'


def summary_table(steps: list[dict]) -> str:
    levels = steps[0]["summary"]["quantile_levels"] if steps else []
    at = " \u00b7 ".join(f"{level:g}" for level in levels)
    heads = ["step", "selector", "ratio \u03c1", "kept / valid", "kept fraction"]
    heads += [f"{label} at q {at}" for label in STATISTICS.values()]
    heads += ["samples", "selection rules"]
    head = "".join(f"<th>{html.escape(text)}</th>" for text in heads)
    rows = "".join(summary_row(step["summary"]) for step in steps)
    return f'<table id="summary"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def controls(steps: list[dict]) -> str:
    step_options = '<option value="all">all</option>' + "".join(
        f'<option value="{int(step["summary"]["step"])}">{int(step["summary"]["step"])}</option>'
        for step in steps
    )
    sort_options = "".join(
        f'<option value="{value}">{label}</option>' for value, label in SORT_ORDERS.items()
    )
    return (
        '<div id="controls">'
        f'<label>step <select id="step-filter">{step_options}</select></label>'
        '<label><input type="checkbox" id="only-selected"> only samples with selected positions</label>'
        f'<label>sort samples <select id="sort">{sort_options}</select></label>'
        '<span>selector score: low <span class="gradient"></span> high</span>'
        '<span class="legend-selected">selected</span>'
        '<span id="shown"></span>'
        "</div>"
    )


def render_page(data: dict) -> str:
    """The whole page for `steps.page_data`'s ``data``."""
    assets = resources.files(__package__)
    style = (assets / "page.css").read_text()
    script = (assets / "page.js").read_text()
    source, tokenizer = html.escape(data["source"]), html.escape(data["tokenizer"])
    steps = data["steps"]
    step_names = ", ".join(str(step["summary"]["step"]) for step in steps)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        f"<title>TA-OPD selection: step {html.escape(step_names)}</title>\n"
        f"<style>\n{style}</style>\n</head>\n<body>\n"
        "<header>\n<h1>TA-OPD selection</h1>\n"
        f'<p class="source">dump <code>{source}</code> \u00b7 tokenizer <code>{tokenizer}</code> \u00b7 '
        "hover a token for D, C, H, their normalised values and the selector's score</p>\n"
        f"{summary_table(steps)}\n</header>\n{controls(steps)}\n"
        '<main id="samples"><noscript>The samples need JavaScript.</noscript></main>\n'
        '<div id="tip" hidden></div>\n'
        f'<script type="application/json" id="{DATA_ELEMENT_ID}">{embedded_json(data)}</script>\n'
        f"<script>\n{script}</script>\n</body>\n</html>\n"
    )
