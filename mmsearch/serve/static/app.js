// mmsearch page: plain JS, no build step, no network beyond this server.
// A query is {mode: "text"|"image"|"similar", q, id, file, key, kind}; the URL holds it
// (?q=..&kind=.., ?similar=ID, ?image=KEY for an image kept in memory), so reload and back/forward work.
"use strict";
(() => {
  const K = 24;
  const KINDS = ["auto", "image", "video", "text", "all"];
  const $ = (id) => document.querySelector(`[data-testid="${id}"]`);
  const ui = {
    form: $("search-form"), input: $("search-input"), kind: $("kind"), file: $("file-input"),
    drop: $("drop-zone"), dropOverlay: $("drop-overlay"), preview: $("query-preview"),
    clearImage: $("clear-image"), status: $("status"), grid: $("results"), more: $("load-more"),
    context: $("context"), welcome: $("welcome"), facts: $("facts"), player: $("player"),
    video: $("player-video"), playerTitle: $("player-title"), playerOriginal: $("player-original"),
    playerClose: $("player-close"), tokenDialog: $("token-dialog"), tokenForm: $("token-form"),
    tokenInput: $("token-input"), tokenError: $("token-error"),
  };
  const images = new Map(); // URL key -> File of an image query (kept for back/forward, not reloads)
  let imageCount = 0;
  let query = null;
  let nextPage = null;
  let seq = 0;
  let loading = false;
  let scoreKind = "cosine";
  const shown = new Set();

  // ---- small helpers ----
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }
  const clock = (s) => {
    if (s === null || s === undefined) return "";
    const whole = Math.floor(s), m = Math.floor(whole / 60), sec = whole % 60;
    return `${m}:${sec < 10 ? "0" : ""}${sec}`;
  };
  const spanText = (a, b) => {
    if (a === null || a === undefined) return "";
    if (b !== null && b !== undefined && b < 60) return `${a.toFixed(1)}–${b.toFixed(1)} s`;
    return `${clock(a)}–${clock(b)}`;
  };
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

  // ---- the API, with the token prompt on a 401 ----
  async function errorText(res) {
    try {
      const body = await res.json();
      if (body && body.error) return body.error;
    } catch (e) { /* not JSON */ }
    return `the server answered ${res.status} ${res.statusText}`.trim();
  }

  async function api(url, init) {
    for (let attempt = 0; ; attempt++) {
      let res;
      try {
        res = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" }, ...init });
      } catch (e) {
        throw new Error(`cannot reach the server (${e.message})`);
      }
      if (res.status === 401 && attempt === 0) {
        await askToken(await errorText(res));
        continue;
      }
      if (!res.ok) throw new Error(await errorText(res));
      return res.json();
    }
  }

  let tokenPrompt = null;
  let tokenTried = false;
  function askToken(message) {
    if (tokenPrompt) return tokenPrompt;
    tokenPrompt = new Promise((resolve) => {
      ui.tokenError.textContent = tokenTried ? "That token was not accepted." : "";
      ui.tokenDialog.title = message;
      ui.tokenDialog.hidden = false;
      ui.tokenInput.value = "";
      ui.tokenInput.focus();
      ui.tokenForm.onsubmit = (ev) => {
        ev.preventDefault();
        const token = ui.tokenInput.value.trim();
        if (!token) return;
        document.cookie = `mmsearch_token=${token}; SameSite=Strict; path=/`;
        tokenTried = true;
        ui.tokenDialog.hidden = true;
        tokenPrompt = null;
        resolve();
      };
    });
    return tokenPrompt;
  }

  function fetchPage(q, page) {
    const params = new URLSearchParams({ k: q.k || K, page, kind: q.kind });
    if (q.mode === "text") {
      params.set("q", q.q);
      return api(`/api/search?${params}`);
    }
    if (q.mode === "similar") return api(`/api/items/${q.id}/similar?${params}`);
    const form = new FormData();
    form.append("image", q.file, q.file.name || "image");
    for (const [k, v] of params) form.append(k, v);
    return api("/api/search", { method: "POST", body: form });
  }

  // ---- status line ----
  function setStatus(state, text) {
    ui.status.dataset.state = state;
    ui.status.textContent = text;
    ui.grid.setAttribute("aria-busy", state === "loading" ? "true" : "false");
  }

  function describe(q) {
    if (q.mode === "text") return `“${q.q}”`;
    if (q.mode === "similar") return "this item";
    return "this image";
  }

  function doneStatus(data, page) {
    const n = shown.size;
    if (n === 0) {
      const other = query.kind === "all" ? "" : " Try another kind, or All.";
      setStatus("empty", `No results for ${describe(query)}.${other}`);
      return;
    }
    const more = data.next_page === null || data.next_page === undefined ? "" : " (more below)";
    const took = typeof data.took_ms === "number" ? ` · ${Math.round(data.took_ms)} ms` : "";
    setStatus("done", `${plural(n, "result")}${more}${page ? "" : took}`);
  }

  // ---- result cards ----
  function scoreBadge(item) {
    if (typeof item.score !== "number") return null;
    return h("span", { class: "score", "data-testid": "score", title: `score (${scoreKind})` }, item.score.toFixed(3));
  }

  function visual(item) {
    const img = h("img", { src: item.thumb, alt: item.name, loading: "lazy", decoding: "async", draggable: "false" });
    img.addEventListener("error", () => img.closest(".thumb").classList.add("broken"), { once: true });
    if (item.kind !== "video") {
      return h("a", { class: "thumb", href: item.media || item.thumb, target: "_blank", rel: "noopener",
                      title: item.name }, img);
    }
    const span = spanText(item.start, item.end);
    return h("button", { type: "button", class: "thumb video", "data-testid": "play", title: `Play ${item.name} ${span}`,
                         "aria-label": `Play ${item.name} ${span}`, onclick: () => play(item) },
      img, h("span", { class: "badge", "aria-hidden": "true" }, h("span", { class: "triangle" })),
      span ? h("span", { class: "span" }, span) : null);
  }

  function textBody(item) {
    return h("div", { class: "thumb words" }, h("blockquote", {}, item.text || ""));
  }

  function card(item) {
    const node = h("article", { class: `card ${item.kind}`, "data-testid": "result", "data-id": item.id,
                                "data-kind": item.kind, "data-rank": item.rank },
      item.kind === "text" ? textBody(item) : visual(item),
      scoreBadge(item),
      h("footer", {},
        h("span", { class: "name", title: item.path || item.name }, item.name || ""),
        h("button", { type: "button", class: "similar", "data-testid": "similar", title: "Find similar items",
                      onclick: () => similarTo(item.id) }, "Similar")));
    return node;
  }

  function append(items) {
    const frag = document.createDocumentFragment();
    for (const item of items) {
      if (shown.has(item.id)) continue; // pages never repeat an item; be safe if they do
      shown.add(item.id);
      frag.append(card(item));
    }
    ui.grid.append(frag);
  }

  // ---- running queries ----
  async function loadPage(page) {
    const mine = ++seq;
    loading = true;
    ui.more.disabled = true;
    setStatus("loading", page ? "Loading more…" : `Searching for ${describe(query)}…`);
    try {
      const data = await fetchPage(query, page);
      if (mine !== seq) return;
      if (data.score_kind) scoreKind = data.score_kind;
      append(data.items || []);
      nextPage = data.next_page === undefined ? null : data.next_page;
      doneStatus(data, page);
    } catch (e) {
      if (mine !== seq) return;
      setStatus("error", e.message);
    } finally {
      if (mine === seq) {
        loading = false;
        ui.more.disabled = false;
        ui.more.hidden = nextPage === null;
        requestAnimationFrame(autoLoad); // still at the bottom (a short page): keep filling it
      }
    }
  }

  function autoLoad() { // infinite scroll: the next page loads when the button comes near the view
    if (loading || nextPage === null || ui.more.hidden) return;
    if (ui.more.getBoundingClientRect().top < window.innerHeight + 300) loadPage(nextPage);
  }

  function urlOf(q) {
    const p = new URLSearchParams();
    if (q.mode === "text") p.set("q", q.q);
    else if (q.mode === "similar") p.set("similar", q.id);
    else p.set("image", q.key);
    if (q.kind !== "auto") p.set("kind", q.kind);
    if (q.k && q.k !== K) p.set("k", q.k);
    return `${location.pathname}?${p}`;
  }

  function run(q, push) {
    query = q;
    nextPage = null;
    shown.clear();
    ui.grid.replaceChildren();
    ui.more.hidden = true;
    ui.welcome.hidden = true;
    if (push && urlOf(q) !== location.pathname + location.search) history.pushState(null, "", urlOf(q));
    reflect(q);
    return loadPage(0);
  }

  function reflect(q) {
    ui.kind.value = q ? q.kind : "auto";
    ui.input.value = q && q.mode === "text" ? q.q : "";
    showPreview(q && q.mode === "image" ? q.file : null);
    showContext(q);
    document.title = q ? `${q.mode === "text" ? q.q : "Similar"} · mmsearch` : "mmsearch";
  }

  let previewUrl = null;
  function showPreview(file) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = file ? URL.createObjectURL(file) : null;
    ui.preview.hidden = !file;
    ui.preview.querySelector("img").src = previewUrl || "";
    ui.drop.classList.toggle("with-image", !!file);
  }

  async function showContext(q) {
    ui.context.replaceChildren();
    ui.context.hidden = !q || q.mode === "text";
    if (!q || q.mode === "text") return;
    if (q.mode === "image") {
      ui.context.append(h("img", { src: previewUrl, alt: "" }), h("span", {}, "Similar to ", h("b", {}, q.file.name || "your image")));
      return;
    }
    ui.context.append(h("span", {}, "Similar to item ", h("b", {}, `#${q.id}`)));
    try {
      const item = await api(`/api/items/${q.id}`);
      if (query !== q) return;
      const pic = item.thumb ? h("img", { src: item.thumb, alt: "" }) : h("q", {}, item.text || "");
      ui.context.replaceChildren(pic, h("span", {}, "Similar to ", h("b", {}, item.name || `#${q.id}`)));
    } catch (e) { /* the search itself reports the error */ }
  }

  const pageSize = () => (query && query.k) || K; // ?k=N in the URL sets it

  function textQuery(text) {
    return { mode: "text", q: text, kind: ui.kind.value, k: pageSize() };
  }

  function similarTo(id) {
    closePlayer();
    window.scrollTo({ top: 0 });
    run({ mode: "similar", id, kind: ui.kind.value, k: pageSize() }, true);
  }

  function searchImage(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      setStatus("error", `${file.name || "that file"} is not an image (${file.type})`);
      return;
    }
    const key = String(++imageCount);
    images.set(key, file);
    if (images.size > 20) images.delete(images.keys().next().value);
    run({ mode: "image", file, key, kind: ui.kind.value, k: pageSize() }, true);
  }

  function fromUrl() {
    const p = new URLSearchParams(location.search);
    const kind = KINDS.includes(p.get("kind")) ? p.get("kind") : "auto";
    const k = /^\d+$/.test(p.get("k") || "") && +p.get("k") >= 1 && +p.get("k") <= 100 ? +p.get("k") : K;
    if (p.has("similar") && /^\d+$/.test(p.get("similar"))) return { mode: "similar", id: Number(p.get("similar")), kind, k };
    if (p.get("q") && p.get("q").trim()) return { mode: "text", q: p.get("q").trim(), kind, k };
    if (p.has("image")) {
      const file = images.get(p.get("image"));
      return file ? { mode: "image", file, key: p.get("image"), kind, k } : { mode: "lost", kind };
    }
    return null;
  }

  function route() {
    closePlayer();
    const q = fromUrl();
    if (q && q.mode !== "lost") return run(q, false);
    seq++;
    query = null;
    shown.clear();
    ui.grid.replaceChildren();
    ui.more.hidden = true;
    reflect(null);
    if (q) {
      ui.kind.value = q.kind;
      setStatus("empty", "Image queries are not kept across reloads: drop, paste or choose the image again.");
    } else {
      setStatus("idle", "");
      showWelcome();
    }
  }

  async function showWelcome() {
    ui.welcome.hidden = false;
    try {
      const info = await api("/api/info");
      const byKind = info.counts_by_kind && typeof info.counts_by_kind === "object"
        ? Object.entries(info.counts_by_kind).filter(([, n]) => n).map(([k, n]) => plural(n, k)).join(", ") : "";
      ui.facts.textContent = `This index holds ${plural(info.count || 0, "item")}${byKind ? ` (${byKind})` : ""}` +
        `${info.model ? `, searched with ${info.model}` : ""}.`;
    } catch (e) {
      ui.facts.textContent = e.message;
    }
  }

  // ---- the video player: plays only when asked ----
  function play(item) {
    if (!item.media) return;
    ui.playerTitle.textContent = `${item.name}  ·  ${spanText(item.start, item.end)}`;
    ui.playerOriginal.href = `/media/${item.id}`;
    ui.video.src = item.media;
    ui.player.hidden = false;
    document.body.classList.add("modal");
    ui.video.play().catch(() => { /* the controls are there; the user can press play */ });
    ui.playerClose.focus();
  }

  function closePlayer() {
    if (ui.player.hidden) return;
    ui.video.pause();
    ui.video.removeAttribute("src");
    ui.video.load();
    ui.player.hidden = true;
    document.body.classList.remove("modal");
  }

  // ---- events ----
  function dragHasFiles(ev) {
    return ev.dataTransfer && Array.from(ev.dataTransfer.types || []).includes("Files");
  }

  function wireDrops() {
    let depth = 0;
    document.addEventListener("dragenter", (ev) => {
      if (!dragHasFiles(ev)) return;
      depth++;
      ui.dropOverlay.hidden = false;
    });
    document.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) ui.dropOverlay.hidden = true;
    });
    document.addEventListener("dragover", (ev) => { if (dragHasFiles(ev)) ev.preventDefault(); });
    document.addEventListener("drop", (ev) => {
      depth = 0;
      ui.dropOverlay.hidden = true;
      if (!dragHasFiles(ev)) return;
      ev.preventDefault();
      searchImage(ev.dataTransfer.files[0]);
    });
    document.addEventListener("paste", (ev) => {
      const items = Array.from((ev.clipboardData && ev.clipboardData.items) || []);
      const pic = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
      if (!pic) return;
      ev.preventDefault();
      searchImage(pic.getAsFile());
    });
  }

  function wireKeys() {
    document.addEventListener("keydown", (ev) => {
      const typing = ev.target.closest && ev.target.closest("input, textarea, select, [contenteditable]");
      if (ev.key === "/" && !typing && !ev.ctrlKey && !ev.metaKey && !ev.altKey) {
        ev.preventDefault();
        ui.input.focus();
        ui.input.select();
      } else if (ev.key === "Escape" && !ui.player.hidden) {
        closePlayer();
      }
    });
  }

  function wireForm() {
    ui.form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const text = ui.input.value.trim();
      if (text) {
        ui.input.blur();
        run(textQuery(text), true);
      }
      else if (query && query.mode === "image") run({ ...query, kind: ui.kind.value }, true);
      else ui.input.focus();
    });
    ui.kind.addEventListener("change", () => {
      if (query) run({ ...query, kind: ui.kind.value }, true);
    });
    ui.file.addEventListener("change", () => {
      searchImage(ui.file.files[0]);
      ui.file.value = "";
    });
    ui.clearImage.addEventListener("click", () => {
      showPreview(null);
      ui.input.focus();
    });
    ui.more.addEventListener("click", () => {
      if (!loading && nextPage !== null) loadPage(nextPage);
    });
    if ("IntersectionObserver" in window) {
      new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting)) autoLoad(); },
                               { rootMargin: "300px" }).observe(ui.more);
    }
  }

  function wirePlayer() {
    ui.playerClose.addEventListener("click", closePlayer);
    ui.player.addEventListener("click", (ev) => { if (ev.target === ui.player) closePlayer(); });
  }

  wireDrops();
  wireKeys();
  wireForm();
  wirePlayer();
  window.addEventListener("popstate", route);
  route();
})();
