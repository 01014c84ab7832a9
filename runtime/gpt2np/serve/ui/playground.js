// The playground: a client of gpt-serve's own API (/v1/completions, streamed) and of /ui/api/
// (config, tokens, explain). No libraries, nothing fetched from elsewhere.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const CONSTRAINT_FIELDS = ["structured_outputs", "response_format", "json_schema", "grammar"];
  const state = {
    config: null,
    names: null,            // every token's name by id (/ui/api/tokens), for the alternatives
    key: sessionStorage.getItem("gpt2np-api-key") || "",
    promptIds: null,        // a branch's prompt as token ids (the prompt box then shows their text)
    choices: [],            // per completion: {prompt: [token], tokens: [token], finish}
    current: 0,             // the completion shown
    controller: null,       // the running request's AbortController
    request: null,          // the last request's options (what "Copy as" reproduces)
    selected: null,         // [choice, index] of the token whose alternatives are shown
  };

  // ------------------------------------------------------------------ the API
  function headers() {
    const h = {"Content-Type": "application/json"};
    if (state.key) h.Authorization = "Bearer " + state.key;
    return h;
  }

  async function failure(r) {
    let body = null;
    try { body = await r.json(); } catch (e) { /* not JSON */ }
    const err = (body && body.error) || {message: `the server answered HTTP ${r.status}`};
    return Object.assign(new Error(err.message), {param: err.param, status: r.status});
  }

  async function call(path, init) {
    const r = await fetch(path, {...(init || {}), headers: headers()});
    if (!r.ok) throw await failure(r);
    return r;
  }

  // ------------------------------------------------------------------ start-up
  async function start() {
    try {
      state.config = await (await call("/ui/api/config")).json();
    } catch (e) {
      if (e.status === 401) return askForKey(state.key ? "That key was refused: " + e.message : null);
      $("model").textContent = "cannot reach the server: " + e.message;
      return;
    }
    $("key-row").hidden = !state.config.api_key;
    $("model").textContent = `${state.config.model} · ${state.config.weights} weights · context ${state.config.n_positions} tokens`;
    buildOptions(state.config.options);
    call("/ui/api/tokens").then((r) => r.json()).then((names) => { state.names = names; render(); })
      .catch((e) => showError("cannot load the vocabulary: " + e.message));
  }

  function askForKey(message) {
    $("key-row").hidden = false;
    $("model").textContent = "this server needs its API key";
    if (message) showError(message, "api-key");
    $("api-key").focus();
  }

  function saveKey() {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("gpt2np-api-key", state.key);
    clearError();
    if (!state.config) start();
  }

  // ------------------------------------------------------------------ options, from the server's limits
  const PAGE_DEFAULTS = {max_tokens: 64, temperature: 1};

  function buildOptions(options) {
    const box = $("options");
    box.replaceChildren();
    for (const o of options) {
      const id = "option-" + o.name;
      const wrap = document.createElement("div");
      wrap.className = "opt";
      const label = document.createElement("label");
      label.htmlFor = id;
      label.textContent = o.name;
      const hint = document.createElement("p");
      hint.className = "hint";
      hint.id = id + "-hint";
      let input;
      if (o.type === "boolean") {
        input = document.createElement("input");
        input.type = "checkbox";
        input.checked = !!o.default;
        wrap.classList.add("check");
        wrap.append(input, label);
      } else if (o.type === "list") {
        input = document.createElement("textarea");
        input.rows = 2;
        wrap.append(label, input);
      } else {
        input = document.createElement("input");
        input.type = "number";
        const integer = o.type === "integer";
        input.step = integer ? "1" : "0.01";
        if (o.minimum !== undefined) input.min = o.minimum;
        else if (o.exclusiveMinimum !== undefined) input.min = o.exclusiveMinimum;  // the hint says ">"
        if (o.maximum !== undefined) input.max = o.maximum;
        let value = o.name in PAGE_DEFAULTS ? PAGE_DEFAULTS[o.name] : o.default;
        if (o.name === "max_tokens") value = Math.min(value, Math.floor(o.maximum / 4));  // room for a prompt
        if (value !== null && value !== undefined) input.value = value;
        wrap.append(label, input);
      }
      input.id = id;
      input.dataset.testid = id;
      input.dataset.name = o.name;
      input.dataset.kind = o.type;
      input.setAttribute("aria-describedby", hint.id);
      hint.textContent = o.help + limits(o);
      wrap.append(hint);
      box.append(wrap);
    }
  }

  function limits(o) {
    const parts = [];
    if (o.minimum !== undefined) parts.push(`≥ ${o.minimum}`);
    if (o.exclusiveMinimum !== undefined) parts.push(`> ${o.exclusiveMinimum}`);
    if (o.maximum !== undefined) parts.push(`≤ ${o.maximum}`);
    if (o.maxItems !== undefined) parts.push(`one per line, at most ${o.maxItems}`);
    return parts.length ? ` (${parts.join(", ")})` : "";
  }

  function optionValues() {
    const out = {};
    for (const input of $("options").querySelectorAll("[data-name]")) {
      const name = input.dataset.name, kind = input.dataset.kind;
      if (kind === "boolean") {
        if (input.checked) out[name] = true;
      } else if (kind === "list") {
        const lines = input.value.split("\n").filter((s) => s.length);
        if (lines.length) out[name] = lines;
      } else if (input.value.trim() !== "") {
        out[name] = Number(input.value);
      }
    }
    return out;
  }

  function constraint() {
    const kind = $("constraint-kind").value, text = $("constraint").value;
    if (kind === "none") return null;
    if (kind === "json_schema") return {json: text};  // the server parses it (and says what is wrong)
    if (kind === "choice") return {choice: text.split("\n").filter((s) => s.length)};
    return {[kind]: text};
  }

  // ------------------------------------------------------------------ a request
  function request() {
    const o = optionValues();
    if (o.seed === undefined) o.seed = Math.floor(Math.random() * 2 ** 31);  // so that Copy as reproduces it
    const prompt = state.promptIds || $("prompt").value;
    const body = {model: state.config.model, prompt, ...o};
    const c = constraint();
    if (c) body.structured_outputs = c;
    return body;
  }

  async function generate() {
    if (state.controller || !state.config) return;
    clearError();
    hideCopied();
    const body = request();
    state.request = body;
    const n = body.n || 1;
    state.choices = Array.from({length: n}, () => ({prompt: [], tokens: [], finish: null, echoed: false}));
    state.current = Math.min(state.current, n - 1);
    state.selected = null;
    const controller = new AbortController();
    state.controller = controller;
    running(true);
    const t0 = performance.now();
    let first = null, last = null, usage = null;
    render();
    try {
      const r = await fetch("/v1/completions", {
        method: "POST", headers: headers(), signal: controller.signal,
        body: JSON.stringify({...body, stream: true, stream_options: {include_usage: true}, echo: true,
                              logprobs: state.config.max_logprobs, return_tokens_as_token_ids: true}),
      });
      if (!r.ok) throw await failure(r);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
            const msg = JSON.parse(line.slice(6));
            if (msg.error) throw Object.assign(new Error(msg.error.message), {param: msg.error.param});
            if (msg.usage) usage = msg.usage;
            for (const c of msg.choices || []) {
              if (take(c) && first === null) first = performance.now();
              last = performance.now();
            }
          }
        }
        render();
        stats(t0, first, last, usage, body, false);
      }
    } catch (e) {
      if (e.name !== "AbortError") showError(e.message, e.param);
    } finally {
      state.controller = null;
      running(false);
      render();
      stats(t0, first, last, usage, body, true);
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  const idOf = (name) => Number(name.slice("token_id:".length));

  // One streamed choice: its echoed prompt (the first chunk of each completion), or a token and
  // its alternatives, or its end. Returns whether it brought a generated token.
  function take(c) {
    const ch = state.choices[c.index];
    if (!ch) return false;
    const lp = c.logprobs;
    if (!ch.echoed) {
      ch.echoed = true;
      const codes = Array.from(c.text), base = lp.text_offset[0];
      ch.prompt = lp.tokens.map((name, k) => ({
        id: idOf(name),
        text: codes.slice(lp.text_offset[k] - base, k + 1 < lp.tokens.length ? lp.text_offset[k + 1] - base : codes.length).join(""),
        lp: lp.token_logprobs[k], top: lp.top_logprobs[k],
      }));
      return false;
    }
    let generated = false;
    if (lp && lp.tokens.length) {
      ch.tokens.push({id: idOf(lp.tokens[0]), text: c.text, lp: lp.token_logprobs[0], top: lp.top_logprobs[0]});
      generated = true;
    } else if (c.text) {  // text without a token of its own: it belongs to the last one
      const t = ch.tokens[ch.tokens.length - 1];
      if (t) t.text += c.text;
    }
    if (c.finish_reason) ch.finish = c.finish_reason;
    return generated;
  }

  // ------------------------------------------------------------------ showing it
  const pct = (p) => (100 * p).toFixed(p >= 0.1 ? 1 : p >= 0.001 ? 2 : 4) + "%";
  const nameOf = (id) => (state.names ? state.names[id] : `token ${id}`);

  function render() {
    const tabs = $("choices");
    tabs.hidden = state.choices.length < 2;
    tabs.replaceChildren(...state.choices.map((_, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.setAttribute("role", "tab");
      b.textContent = `Completion ${i + 1}`;
      b.setAttribute("aria-selected", String(i === state.current));
      b.addEventListener("click", () => { state.current = i; state.selected = null; render(); });
      return b;
    }));
    const ch = state.choices[state.current];
    const out = $("output");
    out.replaceChildren();
    if (!ch) return;
    ch.prompt.forEach((t, k) => out.append(tokenSpan(t, k, true)));
    ch.tokens.forEach((t, k) => out.append(tokenSpan(t, k, false)));
    alternatives();
  }

  function tokenSpan(t, k, isPrompt) {
    const s = document.createElement("span");
    s.className = "tok " + (isPrompt ? "prompt" : "gen");
    s.textContent = t.text;
    s.dataset.text = t.text;
    s.dataset.id = t.id;
    if (t.lp !== null && t.lp !== undefined) {
      const p = Math.exp(t.lp);
      s.dataset.p = String(p);
      if (isPrompt) s.style.setProperty("--s", String(Math.min(-t.lp / 10, 1)));  // surprisal, nats / 10
      else s.style.setProperty("--p", String(p));
      s.title = isPrompt ? `${pct(p)} · surprisal ${(-t.lp / Math.LN2).toFixed(2)} bits` : pct(p);
    }
    if (isPrompt) {
      s.dataset.testid = "prompt-token";
      if (t.lp !== null) s.dataset.surprisal = String(-t.lp);
      return s;
    }
    s.dataset.testid = "token";
    s.dataset.index = k;
    s.tabIndex = 0;
    s.setAttribute("role", "button");
    s.setAttribute("aria-label", `${JSON.stringify(t.text)}, ${t.lp === null ? "" : pct(Math.exp(t.lp))}: show alternatives`);
    const sel = state.selected;
    if (sel && sel[0] === state.current && sel[1] === k) s.classList.add("sel");
    const show = () => select(k);
    s.addEventListener("mouseenter", show);
    s.addEventListener("focus", show);
    s.addEventListener("click", show);
    s.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        select(k);
        const first = $("alternatives").querySelector("button");
        if (first) first.focus();
      }
    });
    return s;
  }

  function select(k) {
    const sel = state.selected;
    if (sel && sel[0] === state.current && sel[1] === k) return;
    state.selected = [state.current, k];
    for (const el of $("output").querySelectorAll(".tok.sel")) el.classList.remove("sel");
    const el = $("output").querySelector(`[data-testid=token][data-index="${k}"]`);
    if (el) el.classList.add("sel");
    alternatives();
  }

  function alternatives() {
    const box = $("alternatives");
    const sel = state.selected;
    const ch = sel && state.choices[sel[0]];
    const t = ch && ch.tokens[sel[1]];
    if (!t || !t.top) { box.hidden = true; box.replaceChildren(); return; }
    const h = document.createElement("h2");
    h.textContent = `Token ${sel[1] + 1}: ${JSON.stringify(t.text)} — what the model considered`;
    const list = document.createElement("ol");
    const entries = Object.entries(t.top).map(([name, lp]) => [idOf(name), lp]).sort((a, b) => b[1] - a[1]);
    for (const [id, lp] of entries) {
      const p = Math.exp(lp), text = nameOf(id);
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.testid = "alternative";
      b.dataset.text = text;
      b.dataset.p = String(p);
      b.dataset.id = id;
      if (id === t.id) b.setAttribute("aria-current", "true");
      const label = document.createElement("span");
      label.textContent = JSON.stringify(text);
      const value = document.createElement("span");
      value.textContent = pct(p);
      b.append(label, value);
      b.setAttribute("aria-label", `${JSON.stringify(text)}, ${pct(p)}${id === t.id ? " (chosen)" : ""}: go on from here with it`);
      b.addEventListener("click", () => branch(sel[0], sel[1], id));
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = (100 * p).toFixed(1) + "%";
      li.append(b, bar);
      list.append(li);
    }
    box.replaceChildren(h, list);
    box.hidden = false;
  }

  // Go on from token k of completion c with token `id` in its place: the prompt becomes the ids up
  // to there (the prompt box shows their text), and generation starts again.
  function branch(c, k, id) {
    if (state.controller) return;
    const ch = state.choices[c];
    const ids = [...ch.prompt.map((t) => t.id), ...ch.tokens.slice(0, k).map((t) => t.id), id];
    const name = nameOf(id);
    const text = ch.prompt.map((t) => t.text).join("") + ch.tokens.slice(0, k).map((t) => t.text).join("")
      + (name.startsWith("bytes:") ? "" : name);
    state.promptIds = ids;
    $("prompt").value = text;
    const note = $("branch-note");
    note.textContent = `Going on from token ${k + 1} with ${JSON.stringify(name)}: the prompt is these ${ids.length} `
      + "token ids (the box shows their text). Edit the prompt to start again from text.";
    note.hidden = false;
    state.current = 0;
    generate();
  }

  function stats(t0, first, last, usage, body, done) {
    const parts = [];
    if (first !== null) parts.push(`first token ${Math.round(first - t0)} ms`);
    const ch = state.choices[state.current];
    const made = state.choices.reduce((a, c) => a + c.tokens.length, 0);
    // tokens after the first over their time; when they all came in one read, every token over the request's time
    const after = made - state.choices.length;
    if (first !== null && after > 0 && last - first >= 1) parts.push(`${(after / ((last - first) / 1000)).toFixed(1)} tokens/s`);
    else if (first !== null && made > 0) parts.push(`${(made / ((last - t0) / 1000)).toFixed(1)} tokens/s`);
    if (usage) {
      const cached = (usage.prompt_tokens_details || {}).cached_tokens || 0;
      parts.push(`prompt ${usage.prompt_tokens} tokens (${cached} from the prefix cache)`);
      parts.push(`${usage.completion_tokens} generated`);
    } else if (ch) {
      parts.push(`prompt ${ch.prompt.length} tokens`, `${made} generated`);
    }
    parts.push(`seed ${body.seed}`);
    if (done && ch && ch.finish) parts.push(`finished: ${ch.finish}`);
    if (done && !ch?.finish && first !== null) parts.push("stopped");
    $("stats").textContent = parts.join(" · ");
  }

  function running(on) {
    $("generate").disabled = on;
    $("stop").disabled = !on;
    $("output").setAttribute("aria-busy", String(on));
  }

  function showError(message, param) {
    const el = $("error");
    el.textContent = message;
    el.hidden = false;
    for (const bad of document.querySelectorAll("[aria-invalid=true]")) bad.removeAttribute("aria-invalid");
    let field = null;
    if (CONSTRAINT_FIELDS.includes(param)) field = $("constraint");
    else if (param === "prompt") field = $("prompt");
    else if (param === "api-key") field = $("api-key");
    else if (param) field = $("option-" + param);
    // the message goes next to the field it is about (or under the buttons)
    if (field) {
      field.setAttribute("aria-invalid", "true");
      field.setAttribute("aria-errormessage", "error");
      (field.closest(".opt") || field).after(el);
    } else {
      $("actions").after(el);
    }
  }

  function clearError() {
    const el = $("error");
    el.hidden = true;
    el.textContent = "";
    for (const bad of document.querySelectorAll("[aria-invalid=true]")) bad.removeAttribute("aria-invalid");
  }

  // ------------------------------------------------------------------ copy as
  const sh = (s) => "'" + String(s).replace(/'/g, "'\\''") + "'";

  function py(v, indent) {
    if (v === null || v === undefined) return "None";
    if (v === true) return "True";
    if (v === false) return "False";
    if (typeof v === "number" || typeof v === "string") return JSON.stringify(v);
    const pad = " ".repeat(indent + 4), end = " ".repeat(indent);
    if (Array.isArray(v)) return "[" + v.map((x) => py(x, indent)).join(", ") + "]";
    return "{\n" + Object.entries(v).map(([k, x]) => `${pad}${JSON.stringify(k)}: ${py(x, indent + 4)}`).join(",\n") + `,\n${end}}`;
  }

  const OPENAI_PARAMS = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "presence_penalty",
                         "frequency_penalty", "seed"];

  function copyText(kind) {
    const body = state.request;
    const base = location.origin;
    if (kind === "curl") {
      return [`curl -sS ${base}/v1/completions`, `  -H 'Content-Type: application/json'`,
              ...(state.key ? [`  -H ${sh("Authorization: Bearer " + state.key)}`] : []),
              `  -d ${sh(JSON.stringify(body))}`].join(" \\\n");
    }
    if (kind === "python") {
      const args = [], extra = {};
      for (const [k, v] of Object.entries(body)) {
        if (OPENAI_PARAMS.includes(k)) args.push(`    ${k}=${py(v, 4)},`);
        else extra[k] = v;
      }
      if (Object.keys(extra).length) args.push(`    extra_body=${py(extra, 4)},`);
      return ["from openai import OpenAI", "",
              `client = OpenAI(base_url=${JSON.stringify(base + "/v1")}, api_key=${JSON.stringify(state.key || "none")})`,
              "completion = client.completions.create(", ...args, ")",
              "print(completion.choices[0].text, end=\"\")"].join("\n");
    }
    // gpt-run: one completion, the one shown (completion j of n is seeded with seed + j)
    const b = body, args = ["gpt-run", sh(state.config.model_dir)];
    const ids = Array.isArray(b.prompt) || b.prompt.includes("<|endoftext|>");
    if (ids) {  // token ids as given, or text with <|endoftext|>, which the API reads as the special token
      const list = Array.isArray(b.prompt) ? b.prompt : state.choices[state.current].prompt.map((t) => t.id);
      args.push(sh(list.join(",")), "--ids");
    } else {
      args.push(sh(b.prompt));
    }
    if (state.config.weights !== "float32") args.push("--weights", state.config.weights);
    args.push("-n", String(b.max_tokens ?? state.config.n_positions));
    args.push("--temperature", String(b.temperature ?? 1));
    if (b.top_p !== undefined && b.top_p !== 1) args.push("--top-p", String(b.top_p));
    if (b.top_k !== undefined && b.top_k > 0) args.push("--top-k", String(b.top_k));
    args.push("--seed", String(b.seed + state.current));
    if (b.presence_penalty) args.push("--presence-penalty", String(b.presence_penalty));
    if (b.frequency_penalty) args.push("--frequency-penalty", String(b.frequency_penalty));
    for (const s of b.stop || []) args.push("--stop", sh(s));
    if (b.ignore_eos) args.push("--ignore-eos");
    const c = b.structured_outputs;
    if (c && c.json !== undefined) args.push("--json-schema", sh(c.json));
    if (c && c.regex !== undefined) args.push("--regex", sh(c.regex));
    if (c && c.choice) for (const x of c.choice) args.push("--choice", sh(x));
    if (c && c.grammar !== undefined) args.push("--grammar", `<(printf '%s' ${sh(c.grammar)})`);
    return args.join(" ");
  }

  async function copy(kind) {
    if (!state.request) { showError("generate first: Copy as reproduces the last request"); return; }
    const text = copyText(kind);
    $("copied").textContent = text;
    $("copied-caption").textContent = {curl: "curl (the whole response as JSON)",
      python: "Python, with OpenAI's client", "gpt-run": "gpt-run (bash)"}[kind] + " — copied";
    $("copied-box").hidden = false;
    try { await navigator.clipboard.writeText(text); } catch (e) {
      $("copied-caption").textContent += " (select it: the clipboard is not available here)";
    }
  }

  function hideCopied() { $("copied-box").hidden = true; }

  // ------------------------------------------------------------------ explain
  async function explain() {
    if (!state.config) return;
    clearError();
    const ch = state.choices[state.current];
    const text = ch ? ch.prompt.map((t) => t.text).join("") + ch.tokens.map((t) => t.text).join("") : $("prompt").value;
    const tab = window.open("", "_blank");
    try {
      const r = await call("/ui/api/explain", {method: "POST", body: JSON.stringify({prompt: text})});
      const url = URL.createObjectURL(new Blob([await r.text()], {type: "text/html"}));
      if (tab) tab.location.href = url; else location.assign(url);
    } catch (e) {
      if (tab) tab.close();
      showError(e.message, e.param);
    }
  }

  // ------------------------------------------------------------------ wiring
  document.addEventListener("DOMContentLoaded", () => {
    $("api-key").value = state.key;
    $("generate").addEventListener("click", generate);
    $("stop").addEventListener("click", stop);
    $("explain").addEventListener("click", explain);
    $("key-save").addEventListener("click", saveKey);
    $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") saveKey(); });
    for (const b of document.querySelectorAll("[data-copy]")) b.addEventListener("click", () => copy(b.dataset.copy));
    $("prompt").addEventListener("input", () => { state.promptIds = null; $("branch-note").hidden = true; });
    $("constraint-kind").addEventListener("change", () => {
      const kind = $("constraint-kind").value;
      $("constraint").disabled = kind === "none";
      $("constraint").placeholder = {json_schema: '{"type": "object", "properties": {"name": {"type": "string"}}}',
        regex: "[0-9]{4}-[0-9]{2}-[0-9]{2}", choice: "yes\nno", grammar: 'start: "yes" | "no"', none: ""}[kind];
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
      else if (e.key === "Escape" && state.controller) { e.preventDefault(); stop(); }
    });
    start();
  });
})();
