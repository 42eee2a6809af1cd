// A small Markdown renderer that cannot inject HTML: it never parses text as HTML. It builds DOM nodes
// and puts every piece of model or user text in with createTextNode, so `<script>` or `<img onerror>`
// in a message is shown as the characters it is. Links keep only http(s) addresses.
//
// Blocks: ``` fenced code (an unclosed fence, as while streaming, runs to the end), # headings, - / 1.
// lists, > quotes, --- rules, paragraphs. Inline: `code`, **bold**, *italic* / _italic_, [text](http...).
"use strict";

const Markdown = (() => {
  const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^\s*>\s?(.*)$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(\S(?:[\s\S]*?\S)?)\*\*|\*(\S(?:[^*]*?\S)?)\*|\b_(\S(?:[^_]*?\S)?)_\b|\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g;

  function el(tag, className) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    return node;
  }

  function inline(text, parent) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      let node;
      if (m[1]) { node = el("code"); node.textContent = m[2]; }
      else if (m[3] !== undefined) { node = el("strong"); inline(m[3], node); }
      else if (m[4] !== undefined) { node = el("em"); inline(m[4], node); }
      else if (m[5] !== undefined) { node = el("em"); inline(m[5], node); }
      else {
        node = el("a");
        node.textContent = m[6];
        node.href = m[7];  // only http(s): the pattern allows nothing else
        node.target = "_blank";
        node.rel = "noopener noreferrer";
      }
      parent.appendChild(node);
      last = m.index + m[0].length;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
    return parent;
  }

  function codeBlock(lines, lang) {
    const pre = el("pre");
    const code = el("code");
    if (lang) { code.dataset.lang = lang; pre.dataset.lang = lang; }
    code.textContent = lines.join("\n");
    const copy = el("button", "copy");
    copy.type = "button";
    copy.textContent = "Copy";
    copy.addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(code.textContent));
    pre.append(copy, code);
    return pre;
  }

  function render(text) {
    const out = document.createDocumentFragment();
    const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if ((m = FENCE.exec(line))) {
        const body = [];
        i++;
        const fence = m[1];
        const closes = (l) => l.trim().startsWith(fence) && /^[`~]+$/.test(l.trim());
        while (i < lines.length && !closes(lines[i])) body.push(lines[i++]);
        i++;  // the closing fence
        out.appendChild(codeBlock(body, m[2]));
      } else if (!line.trim()) {
        i++;
      } else if ((m = HEADING.exec(line))) {
        out.appendChild(inline(m[2], el("h" + Math.min(m[1].length + 2, 6))));
        i++;
      } else if (RULE.test(line)) {
        out.appendChild(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) { body.push(m[1]); i++; }
        const quote = el("blockquote");
        quote.appendChild(render(body.join("\n")));
        out.appendChild(quote);
      } else if ((m = ITEM.exec(line))) {
        const ordered = /\d/.test(m[1]);
        const list = el(ordered ? "ol" : "ul");
        if (ordered && parseInt(m[1], 10) !== 1) list.start = parseInt(m[1], 10);
        while (i < lines.length && (m = ITEM.exec(lines[i])) && /\d/.test(m[1]) === ordered) {
          list.appendChild(inline(m[2], el("li")));
          i++;
        }
        out.appendChild(list);
      } else {
        const p = el("p");
        let first = true;
        while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i]) &&
               !ITEM.test(lines[i]) && !QUOTE.test(lines[i]) && !RULE.test(lines[i])) {
          if (!first) p.appendChild(el("br"));
          inline(lines[i], p);
          first = false;
          i++;
        }
        out.appendChild(p);
      }
    }
    return out;
  }

  return { render };
})();
