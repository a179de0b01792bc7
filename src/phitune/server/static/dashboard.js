// The phitune dashboard: plain JavaScript, no build step. It calls this server's /v1 routes with the API key typed
// in once, kept in this tab's sessionStorage and sent in the Authorization header (never in a URL).

const KEY = "phitune.apiKey";
const ACTIVE = new Set(["validating_files", "queued", "running", "paused"]);
const SVG = "http://www.w3.org/2000/svg";
const view = document.getElementById("view");
const notice = document.getElementById("notice");
const forgetKey = document.getElementById("forget-key");
let leave = new AbortController(); // aborted when the page changes: its requests and polling stop
let fieldCount = 0;

class ApiError extends Error {
  constructor(status, error) {
    super(error.param ? `${error.message} (${error.param})` : error.message);
    this.status = status;
    this.param = error.param;
  }
}

class NeedsKey extends Error {}

// ------------------------------------------------------------------------------------------------------ elements
function h(tag, attributes = {}, ...children) {
  return build(document.createElement(tag), attributes, children);
}

function s(tag, attributes = {}, ...children) {
  return build(document.createElementNS(SVG, tag), attributes, children);
}

function build(element, attributes, children) {
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) element.append(child);
  }
  return element;
}

function field(label, control, hint) {
  control.id ||= `field-${++fieldCount}`;
  const help = hint ? h("small", { id: `${control.id}-hint` }, hint) : null;
  if (help) control.setAttribute("aria-describedby", help.id);
  return h("div", { class: "field" }, h("label", { for: control.id }, label), control, help);
}

function options(items, selected) {
  return items.map(([value, text]) => h("option", { value, selected: value === selected }, text));
}

function table(caption, headings, body) {
  return h(
    "table",
    {},
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, headings.map((text) => h("th", { scope: "col" }, text)))),
    body,
  );
}

function rows(body, items, row, empty) {
  const fresh = items.length ? items.map(row) : [h("tr", {}, h("td", { colspan: 99 }, empty))];
  const signature = JSON.stringify(fresh.map((tr) => tr.textContent));
  if (body.dataset.signature !== signature) {
    body.replaceChildren(...fresh);
    body.dataset.signature = signature;
  }
}

function jobLink(id) {
  return h("a", { href: `#/jobs/${encodeURIComponent(id)}` }, id);
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "—";
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString();
}

function duration(seconds) {
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) [n, i] = [n / 1024, i + 1];
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function say(text, error = false) {
  notice.textContent = text;
  notice.className = error ? "error" : "";
}

function fail(error) {
  if (error instanceof NeedsKey || error.name === "AbortError") return;
  say(error instanceof ApiError ? error.message : `Something went wrong: ${error.message}`, true);
}

// ----------------------------------------------------------------------------------------------------------- API
async function api(path, { method = "GET", json, form, signal = leave.signal } = {}) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  let body = form;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(`v1/${path}`, { method, headers, body, signal });
  if (response.status === 401) {
    askForKey(key ? "That API key was refused." : null);
    throw new NeedsKey();
  }
  if (!response.ok) {
    let error = { message: `${response.status} ${response.statusText}` };
    try {
      error = (await response.json()).error ?? error;
    } catch {
      // not a JSON error body
    }
    throw new ApiError(response.status, error);
  }
  return response;
}

async function get(path, request) {
  return (await api(path, request)).json();
}

async function every(milliseconds, task) {
  const signal = leave.signal;
  while (!signal.aborted) {
    let again = true;
    try {
      again = await task();
    } catch (error) {
      fail(error);
      if (error instanceof NeedsKey) return;
    }
    if (!again || signal.aborted) return;
    await new Promise((resolve) => setTimeout(resolve, milliseconds));
  }
}

// ------------------------------------------------------------------------------------------------- key and pages
function askForKey(problem) {
  leave.abort();
  leave = new AbortController();
  sessionStorage.removeItem(KEY);
  forgetKey.hidden = true;
  const input = h("input", { type: "password", autocomplete: "off", required: true, spellcheck: "false" });
  const form = h(
    "form",
    {
      class: "card narrow",
      onsubmit: (event) => {
        event.preventDefault();
        sessionStorage.setItem(KEY, input.value.trim());
        start();
      },
    },
    h("h1", {}, "API key"),
    problem ? h("p", { class: "error", role: "alert" }, problem) : null,
    field("API key", input, "This server needs its API key. It stays in this browser tab until you close it."),
    h("button", { type: "submit" }, "Connect"),
  );
  view.replaceChildren(form);
  input.focus();
}

async function start() {
  try {
    await get("phitune");
  } catch (error) {
    fail(error);
    return;
  }
  forgetKey.hidden = !sessionStorage.getItem(KEY);
  route();
}

function route() {
  leave.abort();
  leave = new AbortController();
  say("");
  const [section = "jobs", id] = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  for (const link of document.querySelectorAll("nav a")) {
    if (link.hash === `#/${section || "jobs"}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const pages = { jobs: id ? () => jobPage(id) : jobsPage, files: filesPage, models: modelsPage, chat: () => chatPage(id) };
  view.replaceChildren();
  (pages[section || "jobs"] ?? notFound)().catch(fail);
}

async function notFound() {
  view.append(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs")));
}

// ---------------------------------------------------------------------------------------------------------- jobs
function statusBadge(status) {
  return h("span", { class: `status status-${status}` }, status.replace("_", " "));
}

function progress(job) {
  const label = job.total_steps ? `${job.step} of ${job.total_steps} steps` : `${job.step} steps`;
  const bar = job.total_steps ? h("progress", { max: job.total_steps, value: job.step, "aria-label": label }) : null;
  return h("span", { class: "progress" }, bar, h("span", {}, label));
}

function eta(job) {
  if (!["queued", "running"].includes(job.status) || !job.estimated_finish) return "—";
  return duration(Math.max(0, job.estimated_finish - Date.now() / 1000));
}

async function jobsPage() {
  const body = h("tbody");
  view.append(
    h("h1", {}, "Jobs"),
    await newJobForm(),
    table("Fine-tuning jobs, newest first", ["Job", "Status", "Progress", "ETA", "Model", "Fine-tuned model", "Created"], body),
  );
  await every(2000, async () => {
    const jobs = (await get("fine_tuning/jobs?limit=100")).data;
    rows(
      body,
      jobs,
      (job) =>
        h(
          "tr",
          {},
          h("td", {}, jobLink(job.id)),
          h("td", {}, statusBadge(job.status)),
          h("td", {}, progress(job)),
          h("td", {}, eta(job)),
          h("td", {}, job.model),
          h("td", {}, job.fine_tuned_model ?? "—"),
          h("td", {}, when(job.created_at)),
        ),
      "No jobs yet.",
    );
    return true;
  });
}

async function newJobForm() {
  const [models, files] = await Promise.all([get("models"), get("files?purpose=fine-tune")]);
  const fileChoices = files.data.map((f) => [f.id, `${f.filename} — ${f.examples ?? "?"} examples (${f.id})`]);
  const model = h("select", { required: true }, options(models.data.filter((m) => m.kind === "base").map((m) => [m.id, m.id])));
  const training = h("select", { required: true }, options(fileChoices));
  const validation = h("select", {}, options([["", "none"], ...fileChoices]));
  const method = h("select", {}, options(["lora", "qlora", "dora", "full"].map((m) => [m, m]), "lora"));
  const suffix = h("input", { pattern: "[A-Za-z0-9_\\-]{1,40}" });
  const numbers = {
    epochs: ["Epochs", "1", "1"],
    max_steps: ["Max steps", "", "1"],
    learning_rate: ["Learning rate", "", "any"],
    batch_size: ["Batch size", "4", "1"],
    max_seq_length: ["Max sequence length", "1024", "1"],
    checkpoint_every: ["Checkpoint every (steps)", "", "1"],
    eval_every: ["Validation every (steps)", "", "1"],
  };
  const inputs = Object.fromEntries(
    Object.entries(numbers).map(([name, [, value, step]]) => [name, h("input", { type: "number", min: 0, step, value })]),
  );
  const problem = h("p", { class: "error", role: "alert", hidden: true });
  const form = h(
    "form",
    {
      class: "grid",
      onsubmit: async (event) => {
        event.preventDefault();
        problem.hidden = true;
        const hyperparameters = {};
        for (const [name, input] of Object.entries(inputs)) if (input.value !== "") hyperparameters[name] = Number(input.value);
        const request = {
          model: model.value,
          training_file: training.value,
          validation_file: validation.value || undefined,
          suffix: suffix.value || undefined,
          phitune: { method: method.value, hyperparameters },
        };
        try {
          const job = await get("fine_tuning/jobs", { method: "POST", json: request });
          location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
        } catch (error) {
          if (!(error instanceof ApiError)) throw error;
          problem.textContent = error.message;
          problem.hidden = false;
        }
      },
    },
    field("Base model", model),
    field("Training file", training, fileChoices.length ? null : "Upload a dataset on the Files page first."),
    field("Validation file", validation),
    field("Method", method),
    Object.entries(inputs).map(([name, input]) => field(numbers[name][0], input, name === "learning_rate" ? "Empty: the method's default." : null)),
    field("Suffix", suffix, "Part of the fine-tuned model's name."),
    problem,
    h("button", { type: "submit" }, "Start job"),
  );
  return h("details", { class: "card" }, h("summary", {}, "New job"), form);
}

// ---------------------------------------------------------------------------------------------------- one job
class Curves {
  // Points by metric, attempt and step. A resumed job repeats the steps after its checkpoint: a point stays only if
  // no later attempt started at or before its step, so each step shows the latest attempt's value.
  constructor() {
    this.points = new Map();
    this.firstStep = new Map();
  }

  add(event) {
    const data = event.data;
    if (event.type !== "metrics" || !data || !Number.isInteger(data.step)) return;
    const attempt = data.attempt ?? 0;
    this.firstStep.set(attempt, Math.min(data.step, this.firstStep.get(attempt) ?? data.step));
    for (const [name, value] of Object.entries(data)) {
      if (typeof value !== "number" || name === "step" || name === "attempt") continue;
      if (!this.points.has(name)) this.points.set(name, new Map());
      this.points.get(name).set(`${attempt}:${data.step}`, [attempt, data.step, value]);
    }
  }

  series(...names) {
    const kept = new Map();
    for (const name of names) {
      for (const [attempt, step, value] of this.points.get(name)?.values() ?? []) {
        const superseded = [...this.firstStep].some(([later, first]) => later > attempt && first <= step);
        if (!superseded && (!kept.has(step) || attempt >= kept.get(step)[0])) kept.set(step, [attempt, value]);
      }
    }
    return [...kept].sort((a, b) => a[0] - b[0]).map(([step, [, value]]) => [step, value]);
  }
}

function ticks(low, high, count) {
  const raw = (high - low) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((candidate) => candidate >= raw);
  const first = Math.ceil(low / step) * step;
  return Array.from({ length: Math.floor((high - first) / step + 1e-9) + 1 }, (_, i) => first + i * step);
}

function chart(title, names, format) {
  const id = `chart-${title.toLowerCase().replace(/\W+/g, "-")}`;
  const svg = s("svg", { viewBox: "0 0 480 220", role: "img", "aria-labelledby": `${id}-caption`, "aria-describedby": `${id}-latest`, class: "chart" });
  const latest = h("p", { class: "latest", id: `${id}-latest` }, "No data yet.");
  const figure = h("figure", { class: "card", id }, h("figcaption", { id: `${id}-caption` }, title), svg, latest);

  function draw(series) {
    const [width, height, left, right, top, bottom] = [480, 220, 64, 12, 14, 34];
    const points = series.flat();
    svg.replaceChildren();
    if (!points.length) return;
    let [x0, x1] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1]))];
    if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
    const pad = (y1 - y0) * 0.08 || Math.abs(y0) * 0.1 || 1;
    [y0, y1] = [y0 - pad, y1 + pad];
    const x = (v) => left + ((v - x0) / (x1 - x0)) * (width - left - right);
    const y = (v) => height - bottom - ((v - y0) / (y1 - y0)) * (height - top - bottom);
    for (const t of ticks(y0, y1, 5)) {
      svg.append(
        s("line", { x1: left, x2: width - right, y1: y(t), y2: y(t), class: "grid" }),
        s("text", { x: left - 6, y: y(t) + 4, "text-anchor": "end", class: "tick" }, format(t)),
      );
    }
    for (const t of ticks(x0, x1, 5).filter(Number.isInteger)) {
      svg.append(s("text", { x: x(t), y: height - bottom + 16, "text-anchor": "middle", class: "tick" }, String(t)));
    }
    svg.append(
      s("line", { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: "axis" }),
      s("text", { x: (left + width - right) / 2, y: height - 4, "text-anchor": "middle", class: "label" }, "step"),
    );
    series.forEach((line, i) => {
      if (!line.length) return;
      if (line.length > 1) {
        svg.append(s("polyline", { points: line.map(([a, b]) => `${x(a)},${y(b)}`).join(" "), class: `line series-${i}` }));
      }
      if (line.length === 1 || i > 0) {
        for (const [a, b] of line) svg.append(s("circle", { cx: x(a), cy: y(b), r: 3, class: `dot series-${i}` }));
      }
    });
    names.forEach((name, i) => {
      if (!series[i].length) return;
      const row = top + 4 + i * 16;
      svg.append(
        s("rect", { x: width - right - 130, y: row - 8, width: 10, height: 10, class: `key series-${i}` }),
        s("text", { x: width - right - 114, y: row + 1, class: "legend" }, name),
      );
    });
    const step = Math.max(...points.map((p) => p[0]));
    const values = series.map((line, i) => (line.length ? `${names[i]} ${format(line.at(-1)[1])}` : null)).filter(Boolean);
    latest.textContent = `Latest, step ${step}: ${values.join(", ")}.`;
  }

  return { figure, draw };
}

async function jobPage(id) {
  const path = `fine_tuning/jobs/${encodeURIComponent(id)}`;
  let job = await get(path);
  const curves = new Curves();
  const charts = {
    loss: chart("Loss", ["training loss", "validation loss"], (v) => String(Number(v.toPrecision(3)))),
    rate: chart("Learning rate", ["learning rate"], (v) => v.toExponential(1)),
    speed: chart("Tokens per second", ["tokens/s"], (v) => v.toFixed(0)),
  };
  const status = h("p", { class: "job-status" });
  const summary = h("dl", { class: "summary" });
  const eventsBody = h("tbody");
  const showMetrics = h("input", { type: "checkbox", onchange: () => render([]) });
  const checkpointsBody = h("tbody");
  const result = h("section", { class: "card", "aria-labelledby": "result-title", hidden: true });
  const buttons = {
    pause: ["pause", "Pause", ["queued", "running"]],
    resume: ["resume", "Resume", ["paused"]],
    cancel: ["cancel", "Cancel", ["validating_files", "queued", "running", "paused"]],
  };
  const actions = Object.fromEntries(
    Object.entries(buttons).map(([verb, [, label]]) => [
      verb,
      h("button", {
        type: "button",
        class: verb === "cancel" ? "danger" : null,
        onclick: async () => {
          try {
            job = await get(`${path}/${verb}`, { method: "POST" });
            say(`${label} requested for ${id}.`);
            render([]);
          } catch (error) {
            fail(error);
          }
        },
      }, label),
    ]),
  );
  view.append(
    h("h1", {}, "Job ", h("span", { class: "mono" }, id)),
    status,
    h("div", { class: "actions" }, Object.values(actions)),
    summary,
    h("section", { class: "charts", "aria-label": "Training curves" }, Object.values(charts).map((c) => c.figure)),
    result,
    h("section", {}, h("h2", {}, "Checkpoints"), table("Checkpoints, newest first", ["Step", "Training loss", "Validation loss", "Checkpoint", "Saved"], checkpointsBody)),
    h(
      "section",
      {},
      h("h2", {}, "Events"),
      h("label", { class: "check" }, showMetrics, " Show metrics events (the charts draw them)"),
      table("Events, newest first", ["Time", "Level", "Message"], eventsBody),
    ),
  );
  const events = [];
  let after = null;

  function render(fresh) {
    status.replaceChildren(statusBadge(job.status), " ", progress(job), job.status === "running" ? ` · ETA ${eta(job)}` : "");
    for (const [verb, [, , allowed]] of Object.entries(buttons)) actions[verb].disabled = !allowed.includes(job.status);
    const facts = [
      ["Model", job.model],
      ["Method", job.spec?.method?.type ?? "—"],
      ["Training file", job.training_file],
      ["Validation file", job.validation_file ?? "—"],
      ["Created", when(job.created_at)],
      ["Started", when(job.started_at)],
      ["Finished", when(job.finished_at)],
      ["Trained tokens", job.trained_tokens?.toLocaleString() ?? "—"],
    ];
    if (job.error) facts.push(["Error", job.error.message]);
    summary.replaceChildren(...facts.flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
    if (fresh.length) {
      charts.loss.draw([curves.series("train_loss"), curves.series("valid_loss", "full_valid_loss")]);
      charts.rate.draw([curves.series("learning_rate")]);
      charts.speed.draw([curves.series("tokens_per_second")]);
    }
    rows(
      eventsBody,
      events.filter((e) => showMetrics.checked || e.type !== "metrics").reverse(),
      (e) => h("tr", { class: `level-${e.level}` }, h("td", {}, clock(e.created_at)), h("td", {}, e.level), h("td", {}, e.message)),
      "No events yet.",
    );
    if (job.fine_tuned_model && result.hidden) showResult(result, job);
  }

  await every(1500, async () => {
    job = await get(path);
    const fresh = [];
    for (;;) {
      const page = await get(`${path}/events?order=asc&limit=1000${after ? `&after=${after}` : ""}`);
      fresh.push(...page.data);
      if (page.data.length) after = page.data.at(-1).id;
      if (!page.has_more) break;
    }
    for (const event of fresh) curves.add(event);
    events.push(...fresh);
    const checkpoints = (await get(`${path}/checkpoints?limit=100`)).data;
    rows(
      checkpointsBody,
      checkpoints,
      (c) =>
        h(
          "tr",
          {},
          h("td", {}, String(c.step_number)),
          h("td", {}, c.metrics.train_loss?.toFixed(4) ?? "—"),
          h("td", {}, c.metrics.valid_loss?.toFixed(4) ?? "—"),
          h("td", { class: "mono" }, c.fine_tuned_model_checkpoint ?? c.id),
          h("td", {}, when(c.created_at)),
        ),
      "No checkpoints yet.",
    );
    render(fresh);
    return ACTIVE.has(job.status);
  });
}

function showResult(section, job) {
  const model = job.fine_tuned_model;
  const name = h("input", { required: true, value: `${job.suffix || "ft"}-${job.id.slice(-6)}`, pattern: "[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}" });
  const engine = h("select", {}, options([["torch", "PyTorch"], ["onnx", "ONNX Runtime"]], "torch"));
  const deployed = h("p", { role: "status" });
  const format = h("select", {}, options([["adapter", "PEFT adapter"], ["merged", "merged transformers model"], ["onnx", "ONNX Runtime GenAI"]], "adapter"));
  const exportButton = h("button", { type: "submit" }, "Export and download");
  section.replaceChildren(
    h("h2", { id: "result-title" }, "Result"),
    h("p", {}, "Fine-tuned model ", h("span", { class: "mono" }, model)),
    h(
      "form",
      {
        class: "inline",
        onsubmit: async (event) => {
          event.preventDefault();
          try {
            await get("phitune/deployments", { method: "POST", json: { model, name: name.value, engine: engine.value } });
            deployed.replaceChildren(`Deployed as ${name.value}. `, h("a", { href: `#/chat/${encodeURIComponent(name.value)}` }, "Chat with it"));
          } catch (error) {
            fail(error);
          }
        },
      },
      field("Deployment name", name),
      field("Engine", engine),
      h("button", { type: "submit" }, "Deploy"),
    ),
    deployed,
    h(
      "form",
      {
        class: "inline",
        onsubmit: async (event) => {
          event.preventDefault();
          exportButton.disabled = true;
          say(`Exporting ${model}…`);
          try {
            const response = await api(`phitune/models/${encodeURIComponent(model)}/export`, { method: "POST", json: { format: format.value } });
            const file = /filename="?([^";]+)"?/.exec(response.headers.get("Content-Disposition") ?? "")?.[1] ?? "model.zip";
            const url = URL.createObjectURL(await response.blob());
            const link = h("a", { href: url, download: file, hidden: true });
            document.body.append(link);
            link.click();
            link.remove();
            setTimeout(() => URL.revokeObjectURL(url), 60000);
            say(`Exported ${model} as ${file}.`);
          } catch (error) {
            fail(error);
          } finally {
            exportButton.disabled = false;
          }
        },
      },
      field("Export format", format),
      exportButton,
    ),
  );
  section.hidden = false;
}

// --------------------------------------------------------------------------------------------------------- files
function report(section, result) {
  const tokens = result.tokens;
  const counted = tokens.exact ? `exact, ${tokens.tokenizer} tokenizer` : "approximate";
  const issues = (caption, items) =>
    items.length
      ? table(caption, ["Line", "Category", "Message"], h("tbody", {}, items.map((i) => h("tr", {}, h("td", {}, i.line ? String(i.line) : "file"), h("td", {}, i.category), h("td", {}, i.message)))))
      : null;
  const more = result.error_count - result.errors.length;
  const parts = [
    h("h2", {}, "Validation of ", h("span", { class: "mono" }, result.path)),
    h("p", { class: result.ok ? "ok" : "error" }, result.ok ? "Valid: ready to upload." : `Invalid: ${result.error_count} problem(s). Nothing was uploaded.`),
    h(
      "dl",
      { class: "summary" },
      [
        ["Examples", String(result.examples)],
        ["Format", result.format ?? "—"],
        ["Tokens", `${tokens.total.toLocaleString()} (${tokens.trainable.toLocaleString()} trainable; ${counted})`],
        ["Longest example", `${tokens.max.toLocaleString()} tokens (p95 ${tokens.p95.toLocaleString()})`],
      ].flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]),
    ),
    issues("Problems", result.errors),
    more > 0 ? h("p", {}, `… and ${more} more problem(s).`) : null,
    issues("Warnings", result.warnings),
  ];
  section.replaceChildren(...parts.filter(Boolean));
  section.hidden = false;
}

async function filesPage() {
  const models = (await get("models")).data.filter((m) => m.kind === "base");
  const input = h("input", { type: "file", accept: ".jsonl,.json", required: true });
  const model = h("select", {}, options([["", "approximate counts"], ...models.map((m) => [m.id, m.id])]));
  const section = h("section", { class: "card", "aria-live": "polite", hidden: true });
  const body = h("tbody");
  const refresh = async () =>
    rows(
      body,
      (await get("files")).data,
      (f) => h("tr", {}, h("td", { class: "mono" }, f.id), h("td", {}, f.filename), h("td", {}, f.format ?? "—"), h("td", {}, String(f.examples ?? "—")), h("td", {}, bytes(f.bytes)), h("td", {}, when(f.created_at))),
      "No files yet.",
    );
  const form = h(
    "form",
    {
      class: "card inline",
      onsubmit: async (event) => {
        event.preventDefault();
        const file = input.files[0];
        const check = new FormData();
        check.append("file", file, file.name);
        if (model.value) check.append("model", model.value);
        try {
          const result = await get("phitune/files/validate", { method: "POST", form: check });
          report(section, result);
          if (!result.ok) return;
          const upload = new FormData();
          upload.append("file", file, file.name);
          upload.append("purpose", "fine-tune");
          const stored = await get("files", { method: "POST", form: upload });
          say(`Uploaded ${stored.filename} as ${stored.id}.`);
          await refresh();
        } catch (error) {
          fail(error);
        }
      },
    },
    field("Dataset (JSONL)", input),
    field("Count tokens with", model),
    h("button", { type: "submit" }, "Check and upload"),
  );
  view.append(
    h("h1", {}, "Files"),
    form,
    section,
    table("Stored datasets", ["File", "Name", "Format", "Examples", "Size", "Uploaded"], body),
  );
  await refresh();
}

// -------------------------------------------------------------------------------------------------------- models
async function modelsPage() {
  const body = h("tbody");
  view.append(h("h1", {}, "Models"), table("Base and fine-tuned models", ["Model", "Kind", "Base model", "Job"], body));
  rows(
    body,
    (await get("models")).data,
    (m) => h("tr", {}, h("td", { class: "mono" }, m.id), h("td", {}, m.kind), h("td", {}, m.base_model ?? "—"), h("td", {}, m.job_id ? jobLink(m.job_id) : "—")),
    "No models.",
  );
}

// ---------------------------------------------------------------------------------------------------------- chat
async function chatPage(selected) {
  const deployments = (await get("phitune/deployments")).data;
  const body = h("tbody");
  const refresh = async () =>
    rows(
      body,
      (await get("phitune/deployments")).data,
      (d) =>
        h(
          "tr",
          {},
          h("td", {}, h("a", { href: `#/chat/${encodeURIComponent(d.name)}` }, d.name)),
          h("td", { class: "mono" }, d.model),
          h("td", {}, d.engine),
          h("td", {}, when(d.created_at)),
          h("td", {}, h("button", {
            type: "button",
            class: "danger quiet",
            "aria-label": `Delete deployment ${d.name}`,
            onclick: async () => {
              await api(`phitune/deployments/${encodeURIComponent(d.name)}`, { method: "DELETE" }).catch(fail);
              await refresh();
            },
          }, "Delete")),
        ),
      "No deployments: deploy a fine-tuned model from its job's page.",
    );
  view.append(h("h1", {}, "Chat"), table("Deployments", ["Deployment", "Model", "Engine", "Created", ""], body));
  await refresh();
  if (!deployments.length) return;

  const deployment = h("select", {}, options(deployments.map((d) => [d.name, d.name]), selected ?? deployments[0].name));
  const system = h("textarea", { rows: 2 });
  const temperature = h("input", { type: "number", min: 0, max: 2, step: "0.1", value: 0 });
  const maxTokens = h("input", { type: "number", min: 1, max: 4096, value: 128 });
  const message = h("textarea", { rows: 3, required: true });
  const log = h("ol", { class: "conversation", "aria-live": "polite", "aria-label": "Conversation" });
  const send = h("button", { type: "submit" }, "Send");
  const stop = h("button", { type: "button", disabled: true }, "Stop");
  const history = [];
  let streaming = null;
  stop.addEventListener("click", () => streaming?.abort());
  const addMessage = (role, text) => {
    const content = h("p", {}, text);
    log.append(h("li", { class: `message ${role}` }, h("span", { class: "role" }, role === "user" ? "You" : "Model"), content));
    return content;
  };
  const form = h(
    "form",
    {
      class: "card chat",
      onsubmit: async (event) => {
        event.preventDefault();
        const text = message.value.trim();
        if (!text) return;
        message.value = "";
        history.push({ role: "user", content: text });
        addMessage("user", text);
        const answer = addMessage("assistant", "");
        const messages = [...(system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []), ...history];
        streaming = new AbortController();
        [send.disabled, stop.disabled] = [true, false];
        log.setAttribute("aria-busy", "true");
        let reply = "";
        try {
          const request = { model: deployment.value, messages, stream: true, temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) };
          const response = await api("chat/completions", { method: "POST", json: request, signal: streaming.signal });
          const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
          let buffer = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffer += value;
            let end;
            while ((end = buffer.indexOf("\n\n")) >= 0) {
              const line = buffer.slice(0, end);
              buffer = buffer.slice(end + 2);
              if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
              const chunk = JSON.parse(line.slice(6));
              if (chunk.error) throw new ApiError(500, chunk.error);
              reply += chunk.choices?.[0]?.delta?.content ?? "";
              answer.textContent = reply;
            }
          }
        } catch (error) {
          if (error.name !== "AbortError") fail(error);
        } finally {
          history.push({ role: "assistant", content: reply });
          answer.parentElement.dataset.done = "true";
          [send.disabled, stop.disabled] = [false, true];
          log.removeAttribute("aria-busy");
          streaming = null;
        }
      },
    },
    h("h2", {}, "Playground"),
    h("div", { class: "grid" }, field("Deployment", deployment), field("Temperature", temperature), field("Max tokens", maxTokens)),
    field("System prompt", system),
    log,
    field("Message", message),
    h("div", { class: "actions" }, send, stop, h("button", {
        type: "button",
        class: "quiet",
        onclick: () => {
          history.length = 0;
          log.replaceChildren();
        },
      }, "Clear")),
  );
  view.append(form);
}

// ---------------------------------------------------------------------------------------------------------- start
forgetKey.addEventListener("click", () => askForKey(null));
window.addEventListener("hashchange", route);
start();
