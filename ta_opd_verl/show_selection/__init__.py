"""``ta-opd show-selection``: a selection dump (``ta_opd.selection_dump_dir``) as one self-contained HTML
page, to see which response tokens TA-OPD trained on and why.

- `tokens`: the student's tokenizer and each token's text.
- `steps`: a dump's steps read back and checked, as the data the page embeds.
- `page`: the HTML page (inline CSS and JavaScript from `page.css` / `page.js`, the data as JSON, a CSP
  that allows no network request).
- `main`: the command line; `write_selection_page`, which `ta-opd demo` calls too.
"""
