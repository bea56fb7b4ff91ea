// Small panels for task models, shown only when /v1/models lists one: embed-and-compare
// (/v1/embeddings, cosine similarity of two texts), classify (/v1/classify) and generate an
// image (/v1/images/generations). A model entry's "task" field says which kind it is
// ("embedding", "classification", "zero-shot-classification", "text-to-image").

import { postJSON } from "./api.js";

const KINDS = [
  { kind: "embed", pattern: /embed|feature-extraction|sentence-similarity/i },
  { kind: "classify", pattern: /classif|sentiment|zero-shot/i },
  { kind: "image", pattern: /image|diffus/i },
];

// "chat", "embed", "classify" or "image" for a /v1/models entry.
export function taskKind(model) {
  const task = String(model.task ?? "chat");
  return KINDS.find((k) => k.pattern.test(task))?.kind ?? "chat";
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function panel(title, models) {
  const select = el("select", { className: "task-model" });
  for (const m of models) select.append(el("option", { value: m.id, textContent: m.id }));
  const out = el("div", { className: "task-output", role: "status" });
  const box = el("fieldset", { className: "task-panel" }, el("legend", { textContent: title }), select);
  return { box, select, out };
}

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return dot / Math.sqrt(na * nb || 1);
}

async function run(out, job) {
  out.textContent = "…";
  try {
    await job();
  } catch (err) {
    out.textContent = `Error: ${err.message}`;
  }
}

function embedPanel(models, apiKey) {
  const { box, select, out } = panel("Embed and compare", models);
  const a = el("textarea", { rows: 2, placeholder: "First text" });
  const b = el("textarea", { rows: 2, placeholder: "Second text" });
  const go = el("button", { type: "button", textContent: "Compare" });
  go.addEventListener("click", () => run(out, async () => {
    const body = await postJSON("/v1/embeddings", { model: select.value, input: [a.value, b.value] }, apiKey());
    const [x, y] = body.data.map((d) => d.embedding);
    out.textContent = `cosine similarity ${cosine(x, y).toFixed(4)} (${x.length} dimensions)`;
  }));
  box.append(a, b, go, out);
  return box;
}

function classifyPanel(models, apiKey) {
  const { box, select, out } = panel("Classify", models);
  const text = el("textarea", { rows: 2, placeholder: "Text to classify" });
  const labels = el("input", { placeholder: "candidate labels, comma-separated (zero-shot)" });
  const go = el("button", { type: "button", textContent: "Classify" });
  go.addEventListener("click", () => run(out, async () => {
    const payload = { model: select.value, input: text.value };
    const candidates = labels.value.split(",").map((s) => s.trim()).filter(Boolean);
    if (candidates.length) payload.labels = candidates; // zero-shot; none: the model's own labels
    const body = await postJSON("/v1/classify", payload, apiKey());
    const first = body.data?.[0] ?? body;
    const pairs = first.labels && first.scores ? first.labels.map((l, i) => [l, first.scores[i]])
      : (first.probs ? Object.entries(first.probs) : [[first.label, first.score]]);
    out.replaceChildren(...pairs.map(([l, s]) => el("div", { textContent: `${l}: ${Number(s).toFixed(3)}` })));
  }));
  box.append(text, labels, go, out);
  return box;
}

function imagePanel(models, apiKey) {
  const { box, select, out } = panel("Generate an image", models);
  const prompt = el("textarea", { rows: 2, placeholder: "Describe the image" });
  const go = el("button", { type: "button", textContent: "Generate" });
  go.addEventListener("click", () => run(out, async () => {
    const body = await postJSON("/v1/images/generations",
      { model: select.value, prompt: prompt.value, n: 1, response_format: "b64_json" }, apiKey());
    const b64 = body.data?.[0]?.b64_json;
    if (!b64 || !/^[A-Za-z0-9+/=]+$/.test(b64)) throw new Error("no image in the answer");
    out.replaceChildren(el("img", { src: `data:image/png;base64,${b64}`, alt: prompt.value, className: "generated" }));
  }));
  box.append(prompt, go, out);
  return box;
}

const BUILDERS = { embed: embedPanel, classify: classifyPanel, image: imagePanel };

// Rebuilds the task panels for the listed models; apiKey is a function (the key may change).
export function renderTaskPanels(container, models, apiKey) {
  container.replaceChildren();
  for (const [kind, build] of Object.entries(BUILDERS)) {
    const served = models.filter((m) => taskKind(m) === kind);
    if (served.length) container.append(build(served, apiKey));
  }
}
