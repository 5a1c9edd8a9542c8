"""`ta-opd show-selection`: the page built from a selection dump, and that page in a real headless browser.

The dumps here come from the plugin's own dump writer (`selection_dump`, `write_selection_dump`) on
synthetic D, C, H over tiny-pair problems tokenized with the tiny pair's tokenizer (no verl run). The
browser test opens the page in Debian's ``chromium`` (``make setup`` installs it; `headless_browser`
drives it): the page must make no request, and its DOM must mark exactly the dump's selected positions.
It leaves the page and a screenshot under ``outputs/show-selection/`` to look at.
"""

from __future__ import annotations

import html.parser
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from headless_browser import BrowserError, HeadlessChromium

from ta_opd_verl.batch_selection import (
    load_selection_dump,
    load_selection_header,
    select_rollout_batch,
    selection_dump,
    write_selection_dump,
)
from ta_opd_verl.cli.main import main as ta_opd_main
from ta_opd_verl.show_selection.main import write_selection_page
from ta_opd_verl.show_selection.page import DATA_ELEMENT_ID, SELECTED_CLASS, embedded_json, render_page
from ta_opd_verl.show_selection.steps import DumpError, choose_steps, page_data, read_steps
from ta_opd_verl.show_selection.tokens import decode, load_tokenizer, token_texts
from ta_opd_verl.teachability import SelectionRules, TokenStatistics
from ta_opd_verl.tiny.tasks import generate_problems
from ta_opd_verl.tiny.tokenizer import EOS_TOKEN, render_chat

OUTPUTS = Path(__file__).resolve().parents[2] / "outputs" / "show-selection"
# Responses that a page must show as text, never as markup, and multi-byte characters that byte-level BPE
# splits over tokens.
TRICKY_RESPONSES = (
    'a </script><img src=x onerror="alert(1)"> & b',
    "line one\nline 'two' \"quoted\" é 😀 <!-- -->",
)
STEPS = (7, 8)
RULES = SelectionRules(min_keep_per_sample=1)


@pytest.fixture(scope="module")
def student_folder() -> Path:
    from ta_opd_verl.tiny.build import build_tiny_pair

    return Path(build_tiny_pair(quiet=True).student)


@pytest.fixture(scope="module")
def tokenizer(student_folder):
    return load_tokenizer(student_folder)


def write_dump(folder: Path, tokenizer, student_folder: Path, *, samples: int = 10) -> Path:
    """Two steps of a dump as the trainer writes it: tiny-pair problems (plus the tricky responses) with
    random D, C, H, selected by teachability at ρ = 0.1 with one position kept per sample; a padding row as
    verl's batch balancing adds one."""
    problems = generate_problems(samples, seed=3)
    prompts = [tokenizer.encode(render_chat(problem.prompt)) for problem in problems]
    texts = [problem.response + EOS_TOKEN for problem in problems]
    texts[: len(TRICKY_RESPONSES)] = TRICKY_RESPONSES
    responses = [tokenizer.encode(text) for text in texts]
    length = max(map(len, responses))
    padded = [ids + [0] * (length - len(ids)) for ids in responses] + [[0] * length]
    valid = torch.zeros(len(padded), length, dtype=torch.bool)
    for row, ids in enumerate(responses):
        valid[row, : len(ids)] = True
    sample_ids = [f"{row:04d}_0_0" for row in range(len(padded))]
    for step in STEPS:
        generator = torch.Generator().manual_seed(step)
        stats = TokenStatistics(
            torch.rand(valid.shape, generator=generator, dtype=torch.float64).pow(3) * 4,
            torch.rand(valid.shape, generator=generator, dtype=torch.float64),
            torch.rand(valid.shape, generator=generator, dtype=torch.float64) * 2,
        )
        selection = dict(selector="teachability", ratio=0.1, rules=RULES, seed=0, global_step=step)
        mask, _ = select_rollout_batch(stats, valid, sample_ids, **selection)
        records, header = selection_dump(sample_ids, [*prompts, [0]], padded, stats, valid, mask, **selection)
        header["student_path"] = str(student_folder)
        write_selection_dump(folder, step, records, header)
    return folder


@pytest.fixture(scope="module")
def dump(tmp_path_factory, tokenizer, student_folder) -> Path:
    return write_dump(tmp_path_factory.mktemp("dump") / "selection", tokenizer, student_folder)


def embedded_data(page: str) -> dict:
    start = page.index(f'<script type="application/json" id="{DATA_ELEMENT_ID}">')
    start = page.index(">", start) + 1
    return json.loads(page[start : page.index("</script>", start)])


class Elements(html.parser.HTMLParser):
    """Start tags of an HTML document with their attributes, and the text of each ``td`` by class."""

    def __init__(self, document: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.cells: dict[str, list[str]] = {}
        self._cell: str | None = None
        self.feed(document)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        self._cell = attributes.get("class") if tag == "td" else None
        if self._cell:
            self.cells.setdefault(self._cell, []).append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._cell:
            self.cells[self._cell][-1] += data

    def with_class(self, name: str) -> list[dict]:
        return [attrs for _, attrs in self.tags if name in (attrs.get("class") or "").split()]


# ---- tokens -------------------------------------------------------------------------------------------


def test_token_texts_add_up_to_the_decoded_response_with_split_characters_whole(tokenizer):
    ids = tokenizer.encode("sum é 😀 done")
    assert tokenizer.batch_decode([[token] for token in ids]).count("\ufffd") >= 2  # é and 😀 are split
    texts = token_texts(tokenizer, ids)
    assert len(texts) == len(ids) and "".join(texts) == decode(tokenizer, ids) == "sum é 😀 done"
    assert "é" in texts and "😀" in texts and not any("\ufffd" in text for text in texts)
    plain = tokenizer.encode("what is 7 plus 5")
    assert token_texts(tokenizer, plain) == [decode(tokenizer, [token]) for token in plain]


class LeadingSpaceTokenizer:
    """A SentencePiece-like tokenizer: "▁" stands for a space, dropped at the start of a decoded text, so
    a token's text depends on whether a token comes before it."""

    pieces = ("\u2581hello", "\u2581world", "!", "\u2581again")

    def decode(self, ids, **_):
        return "".join(self.pieces[i] for i in ids).replace("\u2581", " ").removeprefix(" ")

    def batch_decode(self, sequences, **_):
        return [self.decode(ids) for ids in sequences]


def test_token_texts_keep_the_spaces_a_token_has_only_in_context():
    tokenizer = LeadingSpaceTokenizer()
    ids = [0, 1, 2, 3, 1]
    assert tokenizer.batch_decode([[token] for token in ids])[1] == "world"  # alone: no space
    texts = token_texts(tokenizer, ids)
    assert texts == ["hello", " world", "!", " again", " world"]
    assert "".join(texts) == decode(tokenizer, ids)


def test_a_real_qwen_tokenizer_reads_split_characters_as_text(tmp_path):
    import transformers

    from ta_opd_verl.shapes import tokenizers as shapes

    folder = shapes.write_tokenizer("qwen3", tmp_path / "qwen3")
    config = {"model_type": shapes.family("qwen3").config_model_type, "vocab_size": 151_936}
    (folder / "config.json").write_text(
        json.dumps(config | {"transformers_version": transformers.__version__})
    )
    qwen = load_tokenizer(folder)
    text = "Let 龘 be x <|im_end|>"
    ids = qwen.encode(text)
    texts = token_texts(qwen, ids)
    assert "".join(texts) == text and " 龘" in texts and texts[-1] == "<|im_end|>"


# ---- the page builder ---------------------------------------------------------------------------------


def test_the_page_shows_the_dumps_settings_counts_and_quantiles(dump, tokenizer):
    steps = read_steps(dump, "all")
    page = render_page(page_data(steps, tokenizer, source=str(dump), tokenizer_path="tok"))
    elements = Elements(page)
    records = load_selection_dump(dump)
    assert elements.cells["step"] == [str(step) for step in STEPS]
    for row, step in enumerate(STEPS):
        header = load_selection_header(dump, step)
        kept = sum(len(record["selected"]) for record in records[step])
        valid = sum(len(record["entropy"]) for record in records[step])
        assert kept == header["kept_positions"] and valid == header["valid_positions"]
        assert elements.cells["selector"][row] == "teachability"
        assert float(elements.cells["ratio"][row]) == header["ratio"] == 0.1
        assert elements.cells["kept"][row] == f"{kept} / {valid}"
        assert elements.cells["kept-fraction"][row] == f"{kept / valid:.4f}"
        # ρ = 0.1 plus the min-keep top-up: at least the budget, at most one more per sample.
        assert math.ceil(0.1 * valid) <= kept <= math.ceil(0.1 * valid) + len(records[step])
        shown = [float(value) for value in elements.cells["quantiles-disagreement"][row].split("·")]
        assert shown == pytest.approx(header["quantiles"]["disagreement"], rel=1e-3)
    data = embedded_data(page)
    assert [len(step["samples"]) for step in data["steps"]] == [len(records[step]) for step in STEPS]
    for step, shown in zip(STEPS, data["steps"], strict=True):
        for record, sample in zip(records[step], shown["samples"], strict=True):
            assert sample["selected"] == record["selected"] and sample["ids"] == record["response_ids"]
            assert sample["score"] == pytest.approx(record["score"], rel=1e-3, abs=1e-12)
            assert sample["Cn"] == pytest.approx(record["compatibility_norm"], rel=1e-3, abs=1e-12)


def test_token_text_cannot_leave_the_data_and_the_page_allows_no_network(dump, tokenizer):
    steps = read_steps(dump, "last")
    hostile_source = '<dump> & "x"'
    page = render_page(page_data(steps, tokenizer, source=hostile_source, tokenizer_path="t"))
    (step,) = embedded_data(page)["steps"]
    texts = ["".join(sample["tokens"]) for sample in step["samples"]]
    assert TRICKY_RESPONSES[0] in texts and TRICKY_RESPONSES[1] in texts
    elements = Elements(page)
    assert [tag for tag, _ in elements.tags].count("script") == 2 and "img" not in dict(elements.tags)
    assert page.count("</script>") == 2 and "<!--" not in page
    assert "&lt;dump&gt; &amp; &quot;x&quot;" in page and hostile_source not in page
    (policy,) = [attrs["content"] for tag, attrs in elements.tags if attrs.get("http-equiv")]
    assert policy.startswith("default-src 'none';") and "http" not in policy
    assert not any(attrs.get("src") or attrs.get("href") for _, attrs in elements.tags)
    assert embedded_json({"t": "</script>&"}) == '{"t":"\\u003c/script\\u003e\\u0026"}'


def test_values_json_cannot_hold_show_as_a_dash(dump, tokenizer):
    ((header, records),) = read_steps(dump, "last").values()
    header["quantiles"]["entropy"][1] = float("nan")
    records[0]["disagreement"][0] = float("inf")
    page = render_page(page_data({8: (header, records)}, tokenizer, source="d", tokenizer_path="t"))
    assert embedded_data(page)["steps"][0]["samples"][0]["D"][0] is None
    (shown,) = Elements(page).cells["quantiles-entropy"]
    assert shown.split(" \u00b7 ")[1] == "\u2014"


def test_steps_are_chosen_and_a_dump_without_what_the_page_needs_is_refused(dump, tmp_path):
    assert choose_steps([3, 1, 2], "last") == [3] and choose_steps([3, 1], "all") == [1, 3]
    assert choose_steps([1, 5, 9], "9,1") == [1, 9]
    with pytest.raises(DumpError, match=r"no step \[4\].*holds steps \[1, 5\]"):
        choose_steps([1, 5], "1,4")
    with pytest.raises(DumpError, match="expected 'last', 'all'"):
        choose_steps([1], "first")
    old = tmp_path / "old"
    old.mkdir()
    (old / "step_8.jsonl").write_text((dump / "step_8.jsonl").read_text())
    with pytest.raises(DumpError, match=r"step_8\.header\.json is missing"):
        read_steps(old)
    (old / "step_8.header.json").write_text((dump / "step_8.header.json").read_text())
    record = json.loads((dump / "step_8.jsonl").read_text().splitlines()[0])
    del record["score"]
    (old / "step_8.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(DumpError, match=r"step_8\.jsonl line 1 lacks \['score'\]"):
        read_steps(old)
    with pytest.raises(DumpError, match="does not exist"):
        read_steps(tmp_path / "nowhere")


def test_the_command_finds_the_tokenizer_from_the_header_or_takes_one(dump, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert ta_opd_main(["show-selection", str(dump), "--out", str(out), "--steps", "7"]) == 0
    assert embedded_data(out.read_text())["steps"][0]["summary"]["step"] == 7
    assert str(out) in capsys.readouterr().out
    moved = tmp_path / "moved"
    shutil.copytree(dump, moved)
    header = json.loads((moved / "step_8.header.json").read_text())
    (moved / "step_8.header.json").write_text(json.dumps(header | {"student_path": str(tmp_path / "gone")}))
    assert ta_opd_main(["show-selection", str(moved)]) == 2
    assert "gone does not exist; pass --tokenizer DIR" in capsys.readouterr().err
    tokenizer_dir = header["student_path"]
    assert ta_opd_main(["show-selection", str(moved), "--tokenizer", tokenizer_dir]) == 0
    assert (moved / "selection.html").is_file()


# ---- the page in a headless browser -------------------------------------------------------------------


# Hovering: the hover box's text for the first selected token of the page.
HOVER_FIRST_SELECTED = """
document.querySelector('.tok.sel').dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
document.getElementById('tip').innerText
"""
CHOOSE = """
document.getElementById('{id}').value = '{value}';
document.getElementById('{id}').dispatchEvent(new Event('change'));
"""
SELECTED_PER_SAMPLE = (
    "[...document.querySelectorAll('.sample')].map(s => s.querySelectorAll('.tok.sel').length)"
)


def test_in_a_headless_browser_the_page_marks_each_selected_position_and_makes_no_request(
    tmp_path, tokenizer, student_folder
):
    dump = write_dump(tmp_path / "selection", tokenizer, student_folder, samples=24)
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    page, _ = write_selection_page(dump, OUTPUTS / "selection.html", steps="all")
    records = [record for step in load_selection_dump(dump).values() for record in step]
    screenshot = OUTPUTS / "selection.png"
    screenshot.unlink(missing_ok=True)
    # A page that loads an image: the browser reports that request, so an empty list below means none.
    probe = tmp_path / "probe.html"
    probe.write_text('<html><body><img src="http://example.invalid/x.png"></body></html>')
    try:
        browser = HeadlessChromium(tmp_path / "profile")
    except BrowserError as error:
        pytest.fail(str(error))
    with browser:
        assert "http://example.invalid/x.png" in browser.open(probe)
        requests = browser.open(page)
        dom = browser.dom()
        browser.screenshot(screenshot)
        tip = browser.evaluate(HOVER_FIRST_SELECTED)
        browser.evaluate(CHOOSE.format(id="step-filter", value=STEPS[1]))
        marked_in_last_step = browser.evaluate("document.querySelectorAll('.tok.sel').length")
        browser.evaluate(CHOOSE.format(id="sort", value="kept-desc"))
        kept_by_sample = browser.evaluate(SELECTED_PER_SAMPLE)
        errors = browser.page_errors()
    assert requests == [page.resolve().as_uri()], f"the page made requests: {requests}"
    assert errors == []
    elements = Elements(dom)
    marked = elements.with_class(SELECTED_CLASS)
    assert len(marked) == sum(len(record["selected"]) for record in records) > 0
    assert len(elements.with_class("tok")) == sum(len(record["response_ids"]) for record in records)
    assert len(elements.with_class("sample")) == len(records)
    assert "img" not in {tag for tag, _ in elements.tags}
    by_step = load_selection_dump(dump)
    first = by_step[STEPS[0]][0]
    position = first["selected"][0]
    rows = dict(line.split("\t") for line in tip.splitlines())
    assert rows["position"] == f"{position}  selected"
    assert float(rows["teachability score"]) == pytest.approx(first["score"][position], rel=1e-3)
    for name, label in (("disagreement", "D"), ("compatibility", "C"), ("entropy", "H")):
        shown = [float(value) for value in rows[f"{label} / {label}\u0303"].split("/")]
        expected = [first[name][position], first[name + "_norm"][position]]
        assert shown == pytest.approx(expected, rel=1e-3), name
    assert marked_in_last_step == sum(len(record["selected"]) for record in by_step[STEPS[1]])
    assert kept_by_sample == sorted((len(record["selected"]) for record in by_step[STEPS[1]]), reverse=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
