"use strict";
// The intern2 page: every form posts to its data-endpoint and a renderer turns the JSON answer into DOM nodes.
// Text from the server (labels, captions, translations) only ever goes through textContent, never innerHTML.

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "style") Object.assign(node.style, value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

const percent = (p) => `${(100 * p).toFixed(1)}%`;
const png = (base64) => `data:image/png;base64,${base64}`;

function bars(rows) {
  // rows: [{label, value in [0, 1], note}] -> labelled horizontal bars
  return el("div", {class: "bars"}, ...rows.map((row) => el("div", {class: "bar-row"},
    el("span", {class: "bar-label", title: row.label}, row.label),
    el("span", {class: "bar"}, el("span", {class: "bar-fill", style: {
      width: percent(Math.max(0, Math.min(1, row.value))), background: row.colour || ""}})),
    el("span", {class: "bar-value"}, row.note))));
}

function timing(data) {
  return el("p", {class: "timing"}, `${data.seconds.toFixed(2)} s on the server`);
}

const renderers = {
  topk(data) {
    return [bars(data.top.map((t) => ({label: t.label, value: t.prob, note: percent(t.prob)}))), timing(data)];
  },
  detect(data) {
    const rows = data.objects.map((o) => el("tr", {},
      el("td", {}, o.label), el("td", {}, o.score.toFixed(3)), el("td", {}, o.box.map((v) => v.toFixed(0)).join(", "))));
    return [el("img", {class: "drawing", src: png(data.overlay_png), alt: "detections drawn on the image"}),
      data.objects.length
        ? el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "label"), el("th", {}, "score"),
          el("th", {}, "box (x0, y0, x1, y1)"))), el("tbody", {}, ...rows))
        : el("p", {}, "No object above the score threshold."),
      timing(data)];
  },
  segment(data) {
    return [el("img", {class: "drawing", src: png(data.overlay_png), alt: "segmentation overlay"}),
      bars(data.classes.map((c) => ({label: c.label, value: c.fraction, note: percent(c.fraction),
        colour: c.colour}))), timing(data)];
  },
  retrieve(data) {
    return [el("ol", {class: "ranking"}, ...data.ranking.map((r) => el("li", {},
      el("span", {class: "caption"}, r.text),
      el("span", {class: "bar-value"}, `${percent(r.prob)} · cos ${r.similarity.toFixed(3)}`)))), timing(data)];
  },
  localize(data) {
    const rows = data.segments.map((s) => el("tr", {},
      el("td", {}, s.label), el("td", {}, s.score.toFixed(3)),
      el("td", {}, `${s.segment[0].toFixed(2)} – ${s.segment[1].toFixed(2)} s`)));
    return [data.segments.length
      ? el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "action"), el("th", {}, "score"),
        el("th", {}, "segment"))), el("tbody", {}, ...rows))
      : el("p", {}, "No segment above the score threshold."),
      el("p", {class: "timing"}, `${data.num_features} snippets, ${data.duration.toFixed(1)} s of video, ` +
        `${data.seconds.toFixed(2)} s on the server`)];
  },
  translate(data) {
    return [el("blockquote", {class: "translation", lang: data.tgt_lang}, data.translation),
      el("p", {class: "timing"}, `${data.src_lang} → ${data.tgt_lang}, ${data.seconds.toFixed(2)} s on the server`)];
  },
};

function request(form) {
  // An empty field is left out, so the server's default applies (a blank beams box: the model's).
  const body = new FormData(form);
  for (const [name, value] of [...body.entries()]) if (value === "") body.delete(name);
  if (!form.dataset.json) return {method: "POST", body};
  const fields = Object.fromEntries(body);
  for (const input of form.querySelectorAll("input[type=number]")) {
    if (input.name in fields) fields[input.name] = Number(input.value);
  }
  return {method: "POST", body: JSON.stringify(fields), headers: {"Content-Type": "application/json"}};
}

async function submit(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const card = form.closest(".card");
  const result = card.querySelector(".result");
  const button = form.querySelector("button");
  button.disabled = true;
  card.dataset.state = "working";
  result.replaceChildren(el("p", {class: "working"}, "Working…"));
  try {
    const response = await fetch(form.dataset.endpoint, request(form));
    const data = await response.json().catch(() => ({detail: `${response.status} ${response.statusText}`}));
    if (!response.ok) throw new Error(data.detail || `${response.status} ${response.statusText}`);
    result.replaceChildren(...renderers[form.dataset.render](data));
    card.dataset.state = "done";
  } catch (error) {
    result.replaceChildren(el("p", {class: "error"}, error.message));
    card.dataset.state = "error";
  } finally {
    button.disabled = false;
  }
}

function preview(input) {
  // Show the chosen image next to the form so results can be compared with it.
  const file = input.files[0];
  const card = input.closest(".card");
  card.querySelector(".preview")?.remove();
  if (file && file.type.startsWith("image/")) {
    input.form.after(el("img", {class: "preview", src: URL.createObjectURL(file), alt: "chosen image"}));
  }
}

async function init() {
  const status = document.getElementById("status");
  for (const form of document.querySelectorAll("form")) form.addEventListener("submit", submit);
  for (const input of document.querySelectorAll("input[type=file]")) {
    input.addEventListener("change", () => preview(input));
  }
  try {
    const info = await (await fetch("/v1/models")).json();
    let loaded = 0;
    const cards = document.querySelectorAll(".card");
    for (const card of cards) {
      const model = info.models[card.dataset.slot];
      card.classList.toggle("unloaded", !model.loaded);
      loaded += model.loaded ? 1 : 0;
      card.querySelector(".model").textContent = model.loaded
        ? `${model.architecture} · ${model.parameters.toLocaleString()} parameters`
        : `Not loaded (start the server with ${model.flag})`;
    }
    const languages = info.models.translator.languages || [];
    document.getElementById("languages").replaceChildren(...languages.map((code) => el("option", {value: code})));
    status.textContent = `${loaded} of ${cards.length} models loaded. ` +
      `Uploads up to ${info.limits.max_upload_mb} MB.`;
  } catch (error) {
    status.textContent = `Cannot read the model list: ${error.message}`;
  }
  document.body.dataset.ready = "true";
}

init();
