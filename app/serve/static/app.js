// The mcp-medsam web page: upload, draw/move/delete boxes, see the masks; plain JavaScript, no build step.
// Every call goes to this server's /v1 API (relative URLs, so the page also works behind a path prefix).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);

  // The page's state. Exposed as window.mcpMedsam: the browser test reads it, and it helps in the console.
  // boxes: image pixel indices, max inclusive ({x0, y0, x1, y1}, plus {z0, z1} for a volume);
  // labels: the latest result, box index per pixel (C order, [H, W] or [D, H, W]).
  const state = {
    info: null, image: null, is3d: false, z: 0, boxes: [], selected: -1,
    labels: null, labelShape: null, labelBoxes: null, iou: [], applied: 0,
    pending: false, dirty: false, error: null, slices: new Map(), needsModality: false,
    clicks: new Map(), clickHistory: [],  // box -> [{x, y, z, fg}] in the order made; boxes clicked, for undo
  };
  window.mcpMedsam = state;

  const imageCanvas = $("image"), overlayCanvas = $("overlay"), boxCanvas = $("boxes");

  // ------------------------------------------------------------------ talking to the server

  function authHeaders(extra) {
    const h = Object.assign({}, extra || {});
    const token = $("token").value.trim();
    if (token) h.Authorization = "Bearer " + token;
    return h;
  }

  async function api(path, opts = {}) {
    const r = await fetch(path, Object.assign({}, opts, { headers: authHeaders(opts.headers) }));
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { const j = await r.json(); if (j.detail) msg = j.detail; } catch (e) { /* not JSON */ }
      if (r.status === 401) { $("token-field").hidden = false; msg += " (enter the server's token above)"; }
      throw new Error(msg);
    }
    return r;
  }

  function setStatus(text, isError = false) {
    $("status").textContent = text;
    $("status").classList.toggle("error", isError);
    state.error = isError ? text : null;
  }

  // ------------------------------------------------------------------ colours (as mcp-medsam's overlay PNGs)

  const colourCache = new Map();
  function colour(label) {
    if (!colourCache.has(label)) {
      const h = ((label * 137.508) % 180) * 2, s = 200 / 255, v = 1;  // golden-angle hues
      const f = (n) => { const k = (n + h / 60) % 6; return Math.round(255 * (v - v * s * Math.max(0, Math.min(k, 4 - k, 1)))); };
      colourCache.set(label, [f(5), f(3), f(1)]);
    }
    return colourCache.get(label);
  }

  // ------------------------------------------------------------------ drawing

  function dims() {
    const s = state.image.shape;
    return state.is3d ? { d: s[0], h: s[1], w: s[2] } : { d: 1, h: s[0], w: s[1] };
  }

  function drawOverlay() {
    const ctx = overlayCanvas.getContext("2d");
    ctx.clearRect(0, 0, overlayCanvas.width, overlayCanvas.height);
    if (!state.labels) return;
    const { h, w } = dims();
    const offset = state.is3d ? state.z * h * w : 0;
    const img = ctx.createImageData(w, h);
    const px = img.data;
    for (let i = 0; i < h * w; i++) {
      const label = state.labels[offset + i];
      if (label) {
        const c = colour(label);
        px[4 * i] = c[0]; px[4 * i + 1] = c[1]; px[4 * i + 2] = c[2]; px[4 * i + 3] = 120;
      }
    }
    ctx.putImageData(img, 0, 0);
  }

  function visible(b) { return !state.is3d || (b.z0 <= state.z && state.z <= b.z1); }

  // The box layer has the screen's resolution (not the image's), so outlines stay thin and sharp on
  // small images shown large.
  function drawBoxes(temp) {
    const ctx = boxCanvas.getContext("2d");
    ctx.clearRect(0, 0, boxCanvas.width, boxCanvas.height);
    if (!state.image) return;
    const { h, w } = dims();
    const sx = boxCanvas.width / w, sy = boxCanvas.height / h, dpr = window.devicePixelRatio || 1;
    const all = state.boxes.map((b, i) => [b, i]).filter(([b]) => visible(b));
    if (temp) all.push([temp, state.boxes.length]);
    for (const [b, i] of all) {
      const c = colour(i + 1);
      ctx.strokeStyle = `rgb(${c[0]},${c[1]},${c[2]})`;
      ctx.lineWidth = (i === state.selected ? 3 : 2) * dpr;
      ctx.setLineDash(i === state.selected ? [6 * dpr, 3 * dpr] : []);
      // Box corners are pixel indices (max inclusive): the outline runs round the pixels.
      ctx.strokeRect(b.x0 * sx, b.y0 * sy, (b.x1 - b.x0 + 1) * sx, (b.y1 - b.y0 + 1) * sy);
      ctx.setLineDash([]);
      for (const c of clicksOf(b)) {  // foreground green, background red, on the slice they were made on
        if (state.is3d && c.z !== state.z) continue;
        ctx.fillStyle = c.fg ? "rgb(40,220,60)" : "rgb(235,40,40)";
        ctx.beginPath();
        ctx.arc((c.x + 0.5) * sx, (c.y + 0.5) * sy, 4 * dpr, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  }

  function clicksOf(b) { return state.clicks.get(b) || []; }

  // A click on the selected box's object: foreground (left button) or background (right button, or shift).
  function addClick(b, p, fg) {
    if (!state.info || !state.info.prompts || !state.info.prompts.points) {
      setStatus("This model takes boxes only: clicks need a model with point prompts.", true);
      return;
    }
    state.clicks.set(b, [...clicksOf(b), { x: p.x, y: p.y, z: state.z, fg }]);
    state.clickHistory.push(b);
    boxesChanged();
  }

  function undoClick() {
    while (state.clickHistory.length) {
      const b = state.clickHistory.pop();
      if (state.boxes.includes(b) && clicksOf(b).length) {
        state.clicks.set(b, clicksOf(b).slice(0, -1));
        boxesChanged();
        return;
      }
    }
  }

  async function sliceBitmap(z) {
    const key = state.image.id + ":" + z;
    if (!state.slices.has(key)) {
      const r = await api(`v1/images/${state.image.id}/slices/${z}`);
      state.slices.set(key, await createImageBitmap(await r.blob()));
    }
    return state.slices.get(key);
  }

  async function showSlice(z) {
    state.z = z;
    $("slice-label").textContent = state.is3d ? `${z} / ${dims().d - 1}` : "";
    const bitmap = await sliceBitmap(z);
    if (state.z !== z) return;  // the slider moved on meanwhile
    imageCanvas.getContext("2d").drawImage(bitmap, 0, 0);
    drawOverlay();
    drawBoxes();
  }

  function renderBoxList() {
    const list = $("box-list");
    list.replaceChildren();
    state.boxes.forEach((b, i) => {
      const li = document.createElement("li");
      li.classList.toggle("selected", i === state.selected);
      const iou = state.labelBoxes === JSON.stringify(state.boxes) && state.iou[i] !== undefined
        ? ` (IoU ${state.iou[i].toFixed(2)})` : "";
      li.append(`${b.x0},${b.y0} – ${b.x1},${b.y1}${iou}`);
      if (state.is3d) {
        for (const key of ["z0", "z1"]) {
          const input = document.createElement("input");
          input.type = "number"; input.min = 0; input.max = dims().d - 1; input.value = b[key];
          input.title = key === "z0" ? "first slice" : "last slice";
          input.addEventListener("change", () => {
            const v = Math.max(0, Math.min(dims().d - 1, Math.round(Number(input.value) || 0)));
            b[key] = v;
            if (b.z0 > b.z1) { if (key === "z0") b.z1 = v; else b.z0 = v; }
            boxesChanged();
          });
          li.append(key === "z0" ? "  z " : " – ", input);
        }
      }
      li.addEventListener("click", (ev) => {
        if (ev.target.tagName === "INPUT") return;
        select(i);
        if (state.is3d) { const mid = Math.floor((b.z0 + b.z1) / 2); $("slice").value = mid; showSlice(mid); }
      });
      list.append(li);
    });
    const any = state.boxes.length > 0;
    $("delete-box").disabled = state.selected < 0;
    $("undo-click").disabled = !state.clickHistory.some((b) => state.boxes.includes(b) && clicksOf(b).length);
    $("clear").disabled = !any;
    $("propagate").disabled = !any || state.pending;
  }

  function select(i) {
    state.selected = i;
    renderBoxList();
    drawBoxes();
  }

  // ------------------------------------------------------------------ segmenting

  function decodeRle(l) {
    const n = l.shape.reduce((a, b) => a * b, 1);
    const out = l.dtype === "uint16" ? new Uint16Array(n) : new Uint8Array(n);
    let p = 0;
    for (let i = 0; i < l.rle.length; i += 2) { out.fill(l.rle[i], p, p + l.rle[i + 1]); p += l.rle[i + 1]; }
    return out;
  }

  function applyLabels(body, boxesJson) {
    state.labels = decodeRle(body.labels);
    state.labelShape = body.labels.shape;
    state.labelBoxes = boxesJson;
    state.iou = body.iou || [];
    state.applied += 1;
    drawOverlay();
    renderBoxList();
    $("download").disabled = false;
  }

  function boxRows() {
    return state.boxes.map((b) => state.is3d ? [b.x0, b.y0, b.z0, b.x1, b.y1, b.z1] : [b.x0, b.y0, b.x1, b.y1]);
  }

  function segmentBody() {
    const body = { boxes: boxRows() };
    if (state.boxes.some((b) => clicksOf(b).length)) {
      body.points = state.boxes.map((b) => clicksOf(b).map((c) => state.is3d ? [c.x, c.y, c.z] : [c.x, c.y]));
      body.point_labels = state.boxes.map((b) => clicksOf(b).map((c) => (c.fg ? 1 : 0)));
    }
    if ($("modality").value) body.modality = $("modality").value;
    return JSON.stringify(body);
  }

  // 2D: one request at a time; boxes changed meanwhile are sent as soon as it returns.
  async function segment2d() {
    if (state.pending) { state.dirty = true; return; }
    const image = state.image;
    const boxesJson = JSON.stringify(state.boxes);
    if (!state.boxes.length) {
      state.labels = null; state.labelBoxes = boxesJson; state.iou = []; state.applied += 1;
      drawOverlay(); renderBoxList();
      return;
    }
    state.pending = true;
    const t = performance.now();
    try {
      if (await fetchLabels(image, boxesJson)) {
        setStatus(`${state.boxes.length} box${state.boxes.length > 1 ? "es" : ""}: mask in ${Math.round(performance.now() - t)} ms`);
      }
    } catch (e) {
      setStatus(e.message, true);
    } finally {
      state.pending = false;
      if (state.dirty) { state.dirty = false; segment2d(); }
    }
  }

  // POST the boxes, show the labels if the same image is still open; true when they were applied.
  async function fetchLabels(image, boxesJson) {
    const r = await api(`v1/images/${image.id}/segment`, {
      method: "POST", headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: segmentBody() });
    const body = await r.json();
    if (state.image !== image) return false;
    applyLabels(body, boxesJson);
    return true;
  }

  async function propagate() {
    const image = state.image;
    const boxesJson = JSON.stringify(state.boxes);
    state.pending = true;
    renderBoxList();
    const bar = $("progress");
    bar.hidden = false; bar.value = 0;
    setStatus("Propagating …");
    const poll = setInterval(async () => {
      try {
        const p = await (await api(`v1/images/${image.id}/progress`)).json();
        bar.max = Math.max(p.total, 1); bar.value = p.done;
        setStatus(p.state === "queued" ? "Waiting for the model …" : `Propagating: ${p.done} / ${p.total} box-slices`);
      } catch (e) { /* the answer below reports errors */ }
    }, 400);
    const t = performance.now();
    try {
      if (await fetchLabels(image, boxesJson)) {
        setStatus(`Propagated ${state.boxes.length} box${state.boxes.length > 1 ? "es" : ""} in ${((performance.now() - t) / 1000).toFixed(1)} s`);
      }
    } catch (e) {
      setStatus(e.message, true);
    } finally {
      clearInterval(poll);
      bar.hidden = true;
      state.pending = false;
      renderBoxList();
    }
  }

  function boxesChanged() {
    renderBoxList();
    drawBoxes();
    if (!state.is3d) segment2d();
    else if (state.boxes.length) setStatus("Press Propagate to segment the volume.");
  }

  // ------------------------------------------------------------------ mouse: draw, move, select

  // Page position -> image pixel index: the canvas shows the whole image scaled to its on-screen box.
  function toImage(ev) {
    const r = boxCanvas.getBoundingClientRect();
    const { h, w } = dims();
    const x = Math.floor((ev.clientX - r.left) * w / r.width);
    const y = Math.floor((ev.clientY - r.top) * h / r.height);
    return { x: Math.max(0, Math.min(w - 1, x)), y: Math.max(0, Math.min(h - 1, y)) };
  }

  function hit(p) {
    for (let i = state.boxes.length - 1; i >= 0; i--) {
      const b = state.boxes[i];
      if (visible(b) && b.x0 <= p.x && p.x <= b.x1 && b.y0 <= p.y && p.y <= b.y1) return i;
    }
    return -1;
  }

  let drag = null;  // {mode: "draw" | "move", start, box, orig}

  // An upload without a modality (a PNG, say) cannot be segmented: ask for one before the first box.
  function askModality() {
    setStatus("This upload carries no modality: pick one in the Modality list, then draw a box.");
    $("modality").classList.add("attention");
    $("modality").focus();
  }

  boxCanvas.addEventListener("contextmenu", (ev) => ev.preventDefault());  // the right button clicks background
  boxCanvas.addEventListener("pointerdown", (ev) => {
    if (!state.image || (ev.button !== 0 && ev.button !== 2)) return;
    if (state.needsModality) { askModality(); return; }
    const p = toImage(ev);
    const i = hit(p);
    if (ev.button === 2 || ev.shiftKey) {
      if (i >= 0 && i === state.selected) addClick(state.boxes[i], p, false);
      return;
    }
    boxCanvas.setPointerCapture(ev.pointerId);
    boxCanvas.focus();
    if (i >= 0) {
      const wasSelected = i === state.selected;
      select(i);
      drag = { mode: "move", start: p, box: state.boxes[i], orig: Object.assign({}, state.boxes[i]), wasSelected };
    } else {
      drag = { mode: "draw", start: p, box: { x0: p.x, y0: p.y, x1: p.x, y1: p.y } };
    }
  });

  boxCanvas.addEventListener("pointermove", (ev) => {
    if (!drag) return;
    const p = toImage(ev);
    const { h, w } = dims();
    if (drag.mode === "draw") {
      Object.assign(drag.box, { x0: Math.min(drag.start.x, p.x), x1: Math.max(drag.start.x, p.x),
                                y0: Math.min(drag.start.y, p.y), y1: Math.max(drag.start.y, p.y) });
      drawBoxes(drag.box);
    } else {
      const o = drag.orig;
      const dx = Math.max(-o.x0, Math.min(w - 1 - o.x1, p.x - drag.start.x));
      const dy = Math.max(-o.y0, Math.min(h - 1 - o.y1, p.y - drag.start.y));
      Object.assign(drag.box, { x0: o.x0 + dx, x1: o.x1 + dx, y0: o.y0 + dy, y1: o.y1 + dy });
      drawBoxes();
    }
  });

  function endDrag() {
    if (!drag) return;
    const d = drag;
    drag = null;
    if (d.mode === "draw") {
      if (d.box.x1 - d.box.x0 < 2 || d.box.y1 - d.box.y0 < 2) { select(-1); return; }  // a click, not a box
      if (state.is3d) {
        const depth = dims().d, r = Math.max(2, Math.round(depth * 0.1));
        Object.assign(d.box, { z0: Math.max(0, state.z - r), z1: Math.min(depth - 1, state.z + r) });
      }
      state.boxes.push(d.box);
      state.selected = state.boxes.length - 1;
      boxesChanged();
    } else if (d.box.x0 !== d.orig.x0 || d.box.y0 !== d.orig.y0) {
      state.clicks.delete(d.box);  // the clicks were on the object of the box where it was
      boxesChanged();
    } else if (d.wasSelected) {
      addClick(d.box, d.start, true);  // a click, not a move, on the selected box: foreground
    }
  }
  boxCanvas.addEventListener("pointerup", endDrag);
  boxCanvas.addEventListener("pointercancel", endDrag);

  function deleteSelected() {
    if (state.selected < 0) return;
    state.boxes.splice(state.selected, 1);
    state.selected = -1;
    boxesChanged();
  }

  document.addEventListener("keydown", (ev) => {
    if (["INPUT", "SELECT", "TEXTAREA"].includes(ev.target.tagName)) return;
    if (ev.key === "Delete" || ev.key === "Backspace") { ev.preventDefault(); deleteSelected(); }
    if (ev.key === "z" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); undoClick(); }
  });
  $("delete-box").addEventListener("click", deleteSelected);
  $("undo-click").addEventListener("click", undoClick);
  $("clear").addEventListener("click", () => { state.boxes = []; state.selected = -1; boxesChanged(); });
  $("propagate").addEventListener("click", propagate);

  // ------------------------------------------------------------------ upload, slices, download

  async function upload(file) {
    const previous = state.image;
    const form = new FormData();
    form.append("file", file, file.name);
    if ($("modality").value) form.append("modality", $("modality").value);
    setStatus(`Uploading ${file.name} …`);
    let image;
    try {
      image = await (await api("v1/images", { method: "POST", body: form })).json();
    } catch (e) {
      setStatus(e.message, true);
      return;
    }
    if (previous) api(`v1/images/${previous.id}`, { method: "DELETE" }).catch(() => {});  // free its place
    Object.assign(state, { image, is3d: image.dims === 3, boxes: [], selected: -1, labels: null,
                           labelShape: null, labelBoxes: null, iou: [], slices: new Map() });
    if (image.modality) $("modality").value = image.modality;
    state.needsModality = !$("modality").value;
    const { d, h, w } = dims();
    for (const c of [imageCanvas, overlayCanvas]) { c.width = w; c.height = h; }
    $("view").hidden = false;
    fitCanvas();
    $("slicebar").hidden = !state.is3d;
    $("propagate").hidden = !state.is3d;
    $("slice").max = d - 1;
    $("slice").value = Math.floor(d / 2);
    fillDownloadFormats();
    $("download").disabled = true;
    renderBoxList();
    await showSlice(Math.floor(d / 2));
    setStatus(`${image.name}: ${image.shape.join(" x ")}${state.is3d ? " (volume)" : ""}. Draw a box.`);
    if (state.needsModality) askModality();
    if (image.boxes && image.boxes.length) {  // an NPZ case brings its own boxes
      state.boxes = image.boxes.map((b) => state.is3d ? { x0: b[0], y0: b[1], z0: b[2], x1: b[3], y1: b[4], z1: b[5] }
                                                      : { x0: b[0], y0: b[1], x1: b[2], y1: b[3] });
      if (state.needsModality) { renderBoxList(); drawBoxes(); } else boxesChanged();  // segmented once it is picked
    }
  }

  $("modality").addEventListener("change", () => {
    if (!state.image || !state.needsModality || !$("modality").value) return;
    state.needsModality = false;
    $("modality").classList.remove("attention");
    setStatus(`Modality ${$("modality").value}. Draw a box.`);
    if (state.boxes.length) boxesChanged();
  });

  // Shown as large as the window allows (small volumes' slices scaled up, large pictures down).
  function fitCanvas() {
    if (!state.image) return;
    const { h, w } = dims();
    const room = { w: Math.max(200, Math.min(window.innerWidth - 420, 1000)), h: Math.max(200, window.innerHeight - 190) };
    const scale = Math.min(room.w / w, room.h / h);
    const cssW = Math.round(w * scale), cssH = Math.round(h * scale), dpr = window.devicePixelRatio || 1;
    imageCanvas.style.width = `${cssW}px`;
    imageCanvas.style.height = `${cssH}px`;
    boxCanvas.width = Math.round(cssW * dpr);
    boxCanvas.height = Math.round(cssH * dpr);
    drawBoxes();
  }
  window.addEventListener("resize", fitCanvas);

  $("file").addEventListener("change", () => { if ($("file").files.length) upload($("file").files[0]); });
  $("slice").addEventListener("input", () => showSlice(Number($("slice").value)));

  const FORMATS = { "image/png": "PNG", "application/x-npz": "NPZ", "application/gzip": "NIfTI (.nii.gz)" };
  function fillDownloadFormats() {
    let sel = $("download-format");
    if (!sel) {
      sel = document.createElement("select");
      sel.id = "download-format";
      $("download").after(sel);
    }
    const offered = state.info ? state.info.formats[state.is3d ? "labels_3d" : "labels_2d"] : [];
    const known = offered.filter((k) => k in FORMATS);
    const kinds = [...known.filter((k) => k === "application/gzip"), ...known.filter((k) => k !== "application/gzip")];
    const options = kinds.map((k) => new Option(k === "image/png" ? "PNG (labels 1..N)" : FORMATS[k], k));
    // A 0/1 label PNG looks black in a viewer; this one shows each box's mask in its colour.
    if (!state.is3d) options.splice(1, 0, new Option("PNG (colour, to look at)", "image/png;colour"));
    sel.replaceChildren(...options);
  }

  $("download").addEventListener("click", async () => {
    try {
      const [accept, colour] = $("download-format").value.split(";");
      const r = await api(`v1/images/${state.image.id}/labels${colour ? "?colour=true" : ""}`, { headers: { Accept: accept } });
      const m = /filename="([^"]+)"/.exec(r.headers.get("Content-Disposition") || "");
      const a = document.createElement("a");
      a.href = URL.createObjectURL(await r.blob());
      a.download = m ? m[1] : "labels";
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    } catch (e) {
      setStatus(e.message, true);
    }
  });

  // ------------------------------------------------------------------ start

  async function loadInfo() {
    try {
      state.info = await (await api("v1/info")).json();
    } catch (e) {
      setStatus(e.message, true);
      return;
    }
    const sel = $("modality");
    const keep = sel.value;
    sel.replaceChildren(new Option("(from the upload)", ""), ...state.info.modalities.map((m) => new Option(m, m)));
    sel.value = keep;
    const m = state.info.model;
    $("model").textContent = `${m.description} · runs ${m.runs_at} · weights stored as ${m.precision}`;
    if (!state.error) setStatus(`Pick the modality, then choose a file (${state.info.formats.upload.join(" ")}).`);
  }

  async function start() {
    $("controls").addEventListener("submit", (ev) => ev.preventDefault());
    const fromHash = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (fromHash) {  // #token=... never reaches the server's logs; keep it out of the history too
      sessionStorage.setItem("mcp-medsam-token", decodeURIComponent(fromHash[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
    $("token").value = sessionStorage.getItem("mcp-medsam-token") || "";
    $("token").addEventListener("change", () => { sessionStorage.setItem("mcp-medsam-token", $("token").value.trim()); loadInfo(); });
    try {
      const health = await (await fetch("healthz")).json();
      $("token-field").hidden = health.auth !== "bearer";
    } catch (e) { /* loadInfo reports it */ }
    await loadInfo();
    state.ready = true;
  }
  start();
})();
