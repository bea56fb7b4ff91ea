// Markdown to DOM nodes, for untrusted model output.
//
// Every piece of model text becomes a text node (document.createTextNode / textContent); no
// string is ever parsed as HTML, so "<script>" in an answer is shown as the characters it is.
// Supported: fenced code blocks (```lang), headings, paragraphs, bullet and numbered lists,
// block quotes, inline `code`, **bold**, *italic*, and [links](https://...) whose URL is
// http(s) only (anything else stays text).

const FENCE = /^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*\d+[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

// Inline spans: code first (its content is literal), then links, bold, italic.
// Underscores mark emphasis only outside words, so snake_case names stay as they are.
const INLINE = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\[([^\]\n]+)\]\(([^)\s]+)\)|\*\*([^*\n]+)\*\*|(?<!\w)__([^_\n]+)__(?!\w)|\*([^*\n]+)\*|(?<!\w)_([^_\n]+)_(?!\w)/g;

export function renderInline(text, parent) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    if (m[1]) {
      const code = el("code");
      code.textContent = m[2];
      parent.appendChild(code);
    } else if (m[3]) {
      parent.appendChild(link(m[3], m[4]));
    } else {
      const strong = m[5] ?? m[6];
      const node = el(strong !== undefined ? "strong" : "em");
      renderInline(strong ?? m[7] ?? m[8], node);
      parent.appendChild(node);
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

function link(label, href) {
  let url = null;
  try {
    url = new URL(href, window.location.href);
  } catch {
    url = null;
  }
  if (!url || (url.protocol !== "http:" && url.protocol !== "https:")) {
    return document.createTextNode(`[${label}](${href})`);
  }
  const a = el("a");
  a.href = url.href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  a.textContent = label;
  return a;
}

function codeBlock(lang, lines) {
  const wrap = el("div", "code-block");
  const bar = el("div", "code-bar");
  const name = el("span", "code-lang");
  name.textContent = lang || "code";
  const copy = el("button", "copy");
  copy.type = "button";
  copy.textContent = "Copy";
  const text = lines.join("\n");
  copy.addEventListener("click", () => navigator.clipboard?.writeText(text));
  bar.append(name, copy);
  const pre = el("pre");
  const code = el("code");
  if (lang) code.dataset.lang = lang;
  code.textContent = text;
  pre.appendChild(code);
  wrap.append(bar, pre);
  return wrap;
}

// Render a whole answer (possibly still streaming: an unclosed fence is shown as code so far).
export function renderMarkdown(text, container) {
  container.replaceChildren();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  let paragraph = [];
  const flush = () => {
    if (!paragraph.length) return;
    const p = el("p");
    paragraph.forEach((line, k) => {
      if (k) p.appendChild(el("br"));
      renderInline(line, p);
    });
    container.appendChild(p);
    paragraph = [];
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      flush();
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i += 1; // the closing fence (or the end of a still-streaming answer)
      container.appendChild(codeBlock(fence[2], body));
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      flush();
      const h = el(`h${Math.min(heading[1].length + 2, 6)}`);
      renderInline(heading[2], h);
      container.appendChild(h);
      i += 1;
      continue;
    }
    const listKind = BULLET.test(line) ? "ul" : NUMBERED.test(line) ? "ol" : null;
    if (listKind) {
      flush();
      const list = el(listKind);
      const pattern = listKind === "ul" ? BULLET : NUMBERED;
      while (i < lines.length && pattern.test(lines[i])) {
        const item = el("li");
        renderInline(lines[i].match(pattern)[1], item);
        list.appendChild(item);
        i += 1;
      }
      container.appendChild(list);
      continue;
    }
    if (QUOTE.test(line)) {
      flush();
      const quoted = [];
      while (i < lines.length && QUOTE.test(lines[i])) quoted.push(lines[i++].match(QUOTE)[1]);
      const block = el("blockquote");
      renderMarkdown(quoted.join("\n"), block);
      container.appendChild(block);
      continue;
    }
    if (!line.trim()) flush();
    else paragraph.push(line);
    i += 1;
  }
  flush();
}
