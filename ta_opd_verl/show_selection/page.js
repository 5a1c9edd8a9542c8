// ta-opd show-selection: renders the samples of the embedded selection dump, inlined by page.py.
// Token texts go into the page through textContent only, never as HTML.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("selection-data").textContent);
  const samplesBox = document.getElementById("samples");
  const tip = document.getElementById("tip");
  const stepFilter = document.getElementById("step-filter");
  const onlySelected = document.getElementById("only-selected");
  const sortOrder = document.getElementById("sort");
  const shownLabel = document.getElementById("shown");
  // Each sample's section -> its step and sample, for the hover box.
  const owners = new WeakMap();

  for (const step of data.steps) {
    let low = Infinity;
    let high = -Infinity;
    for (const sample of step.samples) {
      sample.selectedSet = new Set(sample.selected);
      for (const value of sample.score) {
        if (value !== null) {
          low = Math.min(low, value);
          high = Math.max(high, value);
        }
      }
    }
    step.scoreRange = [low, high];
  }

  // The selector's score at a position, as a share of the step's range of scores (0 to 1).
  function shade(value, range) {
    if (value === null) return 0;
    const spread = range[1] - range[0];
    return spread > 0 ? (value - range[0]) / spread : 1;
  }

  function tokenSpan(sample, position, range) {
    const span = document.createElement("span");
    const text = sample.tokens[position];
    span.className = sample.selectedSet.has(position) ? "tok sel" : "tok";
    if (text === "") span.classList.add("empty");
    span.dataset.position = String(position);
    // A newline shows as a visible mark before the line break; a token that ends inside a character as a dot.
    span.textContent = text === "" ? "\u00b7" : text.replace(/\n/g, "\u21b5\n");
    const alpha = 0.08 + 0.8 * shade(sample.score[position], range);
    span.style.backgroundColor = "rgba(230, 85, 13, " + alpha.toFixed(3) + ")";
    return span;
  }

  function sampleSection(step, sample) {
    const section = document.createElement("section");
    section.className = "sample";
    const title = document.createElement("h3");
    title.textContent = "step " + step.summary.step + " \u00b7 " + sample.id + " \u00b7 " +
      sample.selected.length + " of " + sample.tokens.length + " positions selected";
    const prompt = document.createElement("details");
    prompt.className = "prompt";
    const promptTitle = document.createElement("summary");
    promptTitle.textContent = "prompt (" + sample.prompt_tokens + " tokens)";
    const promptText = document.createElement("pre");
    promptText.textContent = sample.prompt;
    prompt.append(promptTitle, promptText);
    const response = document.createElement("div");
    response.className = "response";
    for (let position = 0; position < sample.tokens.length; position++) {
      response.append(tokenSpan(sample, position, step.scoreRange));
    }
    section.append(title, prompt, response);
    owners.set(section, { step: step, sample: sample });
    return section;
  }

  function visibleSamples(step) {
    let samples = step.samples.filter((sample) => !onlySelected.checked || sample.selected.length > 0);
    if (sortOrder.value !== "dump") {
      const sign = sortOrder.value === "kept-desc" ? -1 : 1;
      samples = samples.slice().sort((a, b) => sign * (a.selected.length - b.selected.length));
    }
    return samples;
  }

  function render() {
    const fragment = document.createDocumentFragment();
    let shown = 0;
    let selected = 0;
    for (const step of data.steps) {
      const wanted = stepFilter.value === "all" || stepFilter.value === String(step.summary.step);
      const row = document.querySelector('#summary tr[data-step="' + step.summary.step + '"]');
      if (row) row.classList.toggle("hidden", !wanted);
      if (!wanted) continue;
      for (const sample of visibleSamples(step)) {
        fragment.append(sampleSection(step, sample));
        shown += 1;
        selected += sample.selected.length;
      }
    }
    samplesBox.replaceChildren(fragment);
    shownLabel.textContent = shown + " samples, " + selected + " selected positions shown";
  }

  function formatted(value) {
    return value === null ? "\u2014" : String(value);
  }

  function tipRow(table, name, value) {
    const row = table.insertRow();
    const head = document.createElement("th");
    head.textContent = name;
    const cell = row.insertCell();
    row.append(head, cell);
    cell.textContent = value;
  }

  function showTip(span, event) {
    const owner = owners.get(span.closest(".sample"));
    const sample = owner.sample;
    const position = Number(span.dataset.position);
    const table = document.createElement("table");
    const text = sample.tokens[position];
    // A token that ends inside a character: its bytes show with the token that completes the character.
    const shown = text === "" ? "(part of the next character)" : JSON.stringify(text);
    tipRow(table, "token", shown + "  id " + sample.ids[position]);
    tipRow(table, "position", position + (sample.selectedSet.has(position) ? "  selected" : "  not selected"));
    tipRow(table, owner.step.summary.selector + " score", formatted(sample.score[position]));
    tipRow(table, "D / D\u0303", formatted(sample.D[position]) + "  /  " + formatted(sample.Dn[position]));
    tipRow(table, "C / C\u0303", formatted(sample.C[position]) + "  /  " + formatted(sample.Cn[position]));
    tipRow(table, "H / H\u0303", formatted(sample.H[position]) + "  /  " + formatted(sample.Hn[position]));
    tip.replaceChildren(table);
    tip.hidden = false;
    moveTip(event);
  }

  function moveTip(event) {
    const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 4);
    const y = event.clientY + 18 + tip.offsetHeight > window.innerHeight
      ? event.clientY - tip.offsetHeight - 8
      : event.clientY + 18;
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = Math.max(0, y) + "px";
  }

  samplesBox.addEventListener("mouseover", (event) => {
    const span = event.target.closest(".tok");
    if (span) showTip(span, event);
    else tip.hidden = true;
  });
  samplesBox.addEventListener("mousemove", (event) => {
    if (!tip.hidden) moveTip(event);
  });
  samplesBox.addEventListener("mouseleave", () => {
    tip.hidden = true;
  });
  for (const control of [stepFilter, onlySelected, sortOrder]) control.addEventListener("change", render);
  render();
})();
