"""The HTML of the inside page (what gpt-explain writes; the playground's Explain opens it): one
file, every style, script and datum inline, so that it opens offline and from anywhere. The report
(see `inside.report`) goes in as JSON; the attention maps
as base64 bytes (probability × 255, lower triangle only), which keeps a 64-token page on 124M
near 1 MB. The script draws each map on a canvas and builds the tables; it writes
`data-ready="yes"` on <body> when done, or the error into `data-error`."""

from __future__ import annotations

import html
import json

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 16px 48px; color: #1d2330; }
h1 { font-size: 22px; margin: 20px 0 4px; } h2 { font-size: 18px; margin: 32px 0 8px; border-bottom: 1px solid #ddd; }
.sub { color: #667; margin: 0 0 12px; } code, .tok { font-family: ui-monospace, monospace; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #e2e4ea; padding: 2px 6px; vertical-align: top; }
th { background: #f4f5f8; font-weight: 600; text-align: left; }
.tok { background: #eef2ff; border-radius: 3px; padding: 0 3px; white-space: pre; }
.id { color: #889; font-size: 11px; } .merge { white-space: nowrap; font-size: 12px; }
.merges { max-width: 520px; } .gen { background: #e6f6ea; }
.scroll { max-height: 340px; overflow: auto; border: 1px solid #e2e4ea; margin: 8px 0; } .scroll table { margin: 0; }
.scroll th { position: sticky; top: 0; z-index: 1; } .tall { max-height: 520px; }
.chips { line-height: 2; } .chips .tok { margin-right: 2px; } .text { white-space: pre-wrap; background: #fafbfc; border: 1px solid #e2e4ea; padding: 8px; }
.attn { display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; } .attn > div { flex: 1 1 420px; min-width: 0; }
.attn > div:first-child { overflow: auto; max-height: 760px; }
#grid { display: grid; gap: 2px; align-items: center; } #grid canvas { width: 100%; image-rendering: pixelated; cursor: pointer; border: 1px solid #ccd; }
#grid canvas.sel { outline: 2px solid #e5484d; } #grid .lbl { font-size: 11px; color: #667; text-align: right; padding-right: 4px; }
#big { border: 1px solid #ccd; } .controls { margin: 8px 0; } .controls select { margin-right: 12px; }
.lens td { font-size: 12px; white-space: pre; font-family: ui-monospace, monospace; }
"""

SCRIPT = r"""
(function () {
  const R = JSON.parse(document.getElementById("report").textContent);
  const L = R.model.n_layer, H = R.model.n_head, T = R.tokens.length, tri = T * (T + 1) / 2;
  const raw = atob(R.attention), att = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) att[i] = raw.charCodeAt(i);
  const show = s => s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) k === "text" ? (e.textContent = v) : e.setAttribute(k, v);
    for (const k of kids) e.append(k);
    return e;
  };
  const tok = (s, cls) => el("span", {class: "tok" + (cls ? " " + cls : ""), text: show(s)});
  const pct = p => (100 * p).toFixed(p >= 0.1 ? 1 : 2) + "%";
  const map = (layer, head) => {  // [T, T] of probabilities 0..1
    const m = new Float32Array(T * T), base = (layer * H + head) * tri;
    let k = base;
    for (let r = 0; r < T; r++) for (let c = 0; c <= r; c++) m[r * T + c] = att[k++] / 255;
    return m;
  };
  const paint = (canvas, m, cell) => {
    canvas.width = canvas.height = T * cell;
    const g = canvas.getContext("2d"), img = g.createImageData(T * cell, T * cell);
    for (let y = 0; y < T * cell; y++) for (let x = 0; x < T * cell; x++) {
      const v = Math.sqrt(m[Math.floor(y / cell) * T + Math.floor(x / cell)]), i = 4 * (y * T * cell + x);
      img.data[i] = 255 - 200 * v; img.data[i + 1] = 255 - 170 * v; img.data[i + 2] = 255 - 60 * v; img.data[i + 3] = 255;
    }
    g.putImageData(img, 0, 0);
  };

  // 1. Tokenization
  const chips = document.getElementById("chips");
  R.pieces.forEach(p => p.tokens.forEach((t, i) => chips.append(tok(t), el("span", {class: "id", text: p.ids[i] + " "}))));
  const pieces = document.getElementById("pieces");
  R.pieces.forEach((p, n) => {
    const merges = el("td", {class: "merges"});
    p.merges.forEach(([a, b, rank]) => merges.append(el("span", {class: "merge"}, tok(a), " + ", tok(b), " \u2192 ",
      tok(a + b), el("span", {class: "id", text: " #" + rank})), " "));
    if (!p.merges.length) merges.append(el("span", {class: "id", text: "none"}));
    const toks = el("td");
    p.tokens.forEach((t, i) => toks.append(tok(t), el("span", {class: "id", text: " " + p.ids[i] + " "})));
    pieces.append(el("tr", {}, el("td", {text: n}), el("td", {}, tok(p.text)), el("td", {}, tok(p.byte_chars)), merges, toks));
  });

  // 2. Generation
  const text = document.getElementById("text");
  text.append(R.prompt, el("span", {class: "gen", text: R.text}));
  const gen = document.getElementById("generation");
  R.generated.forEach((g, n) => {
    const alts = el("td");
    g.alternatives.forEach(([id, t, p]) => alts.append(tok(t, id === g.id ? "gen" : ""), el("span", {class: "id", text: " " + pct(p) + " "})));
    gen.append(el("tr", {}, el("td", {text: n + 1}), el("td", {}, tok(g.token, "gen")), el("td", {text: g.id}),
      el("td", {text: pct(g.p)}), alts));
  });

  // 3. Attention: one small map per layer and head, and the chosen one large with the tokens
  const grid = document.getElementById("grid"), big = document.getElementById("big");
  const ls = document.getElementById("layer"), hs = document.getElementById("head");
  grid.style.gridTemplateColumns = "52px repeat(" + H + ", minmax(0, 1fr))";
  grid.append(el("div"));
  for (let h = 0; h < H; h++) grid.append(el("div", {class: "lbl", style: "text-align:center", text: h}));
  for (let l = 0; l < L; l++) {
    ls.append(el("option", {value: l, text: "layer " + l}));
    grid.append(el("div", {class: "lbl", text: "layer " + l}));
    for (let h = 0; h < H; h++) {
      const c = el("canvas", {class: "head", "data-layer": l, "data-head": h, title: "layer " + l + ", head " + h});
      paint(c, map(l, h), 1);
      c.addEventListener("click", () => { ls.value = l; hs.value = h; drawBig(); });
      grid.append(c);
    }
  }
  for (let h = 0; h < H; h++) hs.append(el("option", {value: h, text: "head " + h}));
  function drawBig() {
    const l = +ls.value, h = +hs.value, margin = 96;
    const cell = Math.max(9, Math.min(22, Math.floor((big.parentNode.clientWidth - margin) / T) || 9));
    const m = map(l, h), size = T * cell;
    const inner = el("canvas"); paint(inner, m, cell);
    big.width = big.height = size + margin;
    const g = big.getContext("2d");
    g.fillStyle = "#fff"; g.fillRect(0, 0, big.width, big.height);
    g.drawImage(inner, margin, margin);
    g.fillStyle = "#1d2330"; g.font = Math.min(12, cell) + "px ui-monospace, monospace";
    g.textAlign = "right"; g.textBaseline = "middle";
    R.texts.forEach((t, i) => g.fillText(show(t).slice(0, 14), margin - 4, margin + (i + 0.5) * cell));
    g.save(); g.rotate(-Math.PI / 2); g.textAlign = "left";
    R.texts.forEach((t, i) => g.fillText(show(t).slice(0, 14), -margin + 4, margin + (i + 0.5) * cell));
    g.restore();
    document.querySelectorAll("#grid canvas.sel").forEach(c => c.classList.remove("sel"));
    document.querySelector('#grid canvas[data-layer="' + l + '"][data-head="' + h + '"]').classList.add("sel");
    document.getElementById("bigtitle").textContent = "layer " + l + ", head " + h +
      ": row = the token attending (query), column = the token attended to (key); darker = more (square-root scale)";
  }
  ls.addEventListener("change", drawBig); hs.addEventListener("change", drawBig);
  drawBig();

  // 4. Logit lens: one row per token, one column per layer
  const lens = document.getElementById("lens"), head = el("tr", {}, el("th", {text: "position"}), el("th", {text: "token"}));
  for (let l = 0; l <= L; l++) head.append(el("th", {text: l === 0 ? "embeddings" : l === L ? "output" : "after " + l}));
  lens.append(head);
  R.tokens.forEach((t, i) => {
    const row = el("tr", {class: "lensrow"}, el("td", {text: i}), el("td", {}, tok(t)));
    for (let l = 0; l <= L; l++) {
      const [nt, p] = R.lens[l][i];
      row.append(el("td", {title: pct(p), style: "background: rgba(45, 120, 220, " + (0.08 + 0.6 * p).toFixed(3) + ")",
        text: show(nt).slice(0, 12) + " " + pct(p)}));
    }
    lens.append(row);
  });

  // 5. Shapes
  const shapes = document.getElementById("shapes");
  R.shapes.forEach(([name, shape, what]) => shapes.append(el("tr", {}, el("td", {}, el("code", {text: name})),
    el("td", {}, el("code", {text: shape ? "[" + shape.join(", ") + "]" : ""})), el("td", {text: what}))));
  document.body.dataset.ready = "yes";
})();
"""


def render(report: dict) -> str:
    """The page for a report from `inside.report`."""
    m = report["model"]
    data = json.dumps(report, ensure_ascii=False).replace("<", "\\u003c")  # nothing can end the <script> early
    opts = ", ".join(f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v, ensure_ascii=False)}"
                     for k, v in report["options"].items()) or "greedy"
    prompt = (f"Prompt of {len(report['prompt_ids'])} tokens" if report["pieces"] else
              "The prompt is empty: the model starts from &lt;|endoftext|&gt; (id 50256)")
    n_gen = len(report["generated"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gpt-explain: {html.escape(report["prompt"][:60])}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body data-ready="no">
<script>window.addEventListener("error", e => {{ document.body.dataset.error = String(e.message); }});</script>
<h1>Inside GPT-2</h1>
<p class="sub">{m["n_layer"]} layers, {m["n_head"]} heads, {m["n_embd"]}-wide residual stream, {m["vocab_size"]:,} tokens.
{prompt}; {n_gen} new ({html.escape(opts)}; stopped: {html.escape(report["stop_reason"])}).</p>
<h2>1. Tokenization</h2>
<p class="sub">GPT-2's regex cuts the text into pieces; each piece's UTF-8 bytes become printable characters
(a space is <span class="tok">Ġ</span>, a newline <span class="tok">Ċ</span>); then the merges from <code>merges.txt</code> apply,
lowest rank first, until none applies. What is left are the tokens.</p>
<div class="chips" id="chips"></div>
<div class="scroll"><table><thead><tr><th>#</th><th>piece</th><th>bytes as GPT-2 characters</th><th>merges, in the order applied (#rank)</th><th>tokens and ids</th></tr></thead>
<tbody id="pieces"></tbody></table></div>
<h2>2. Generation</h2>
<p class="sub">Each new token, its probability, and the five most likely tokens at that step (temperature 1, before any filtering).</p>
<div class="text" id="text"></div>
<div class="scroll"><table><thead><tr><th>step</th><th>token</th><th>id</th><th>probability</th><th>most likely at this step</th></tr></thead>
<tbody id="generation"></tbody></table></div>
<h2>3. Attention</h2>
<p class="sub">Every head of every layer: how much each token (row) draws on each earlier token (column). Click a map, or choose:</p>
<div class="controls"><select id="layer"></select><select id="head"></select><span id="bigtitle" class="sub"></span></div>
<div class="attn"><div><canvas id="big"></canvas></div><div><div id="grid"></div></div></div>
<h2>4. Logit lens</h2>
<p class="sub">The next token the model would predict if it stopped after each layer: the residual stream at that
point through the final layer norm and the output head, with its probability.</p>
<div class="scroll tall"><table class="lens" id="lens"></table></div>
<h2>5. Shapes</h2>
<p class="sub">From token ids to logits (T = {len(report["tokens"])} positions).</p>
<table><thead><tr><th>tensor</th><th>shape</th><th></th></tr></thead><tbody id="shapes"></tbody></table>
<script type="application/json" id="report">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""
