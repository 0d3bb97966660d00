"""The labeling page: plain HTML and vanilla JavaScript, no build step, every text set with textContent."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>alignflow labeling</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2330; }
header { background: #1d2330; color: #fff; padding: .6rem 1.2rem; display: flex; gap: 1rem; align-items: center; }
header h1 { font-size: 1.1rem; margin: 0; flex: 1; }
main { max-width: 1100px; margin: 1rem auto; padding: 0 1rem; }
.box { background: #fff; border: 1px solid #d5d9e0; border-radius: 8px; padding: .8rem 1rem; margin: .7rem 0; }
.text p { white-space: pre-wrap; margin: .3rem 0; }
.text pre { background: #f0f2f5; padding: .5rem; overflow-x: auto; border-radius: 4px; }
#instructions { white-space: pre-wrap; }
.card { display: flex; gap: .8rem; background: #fff; border: 2px solid #d5d9e0; border-radius: 8px;
        padding: .6rem; margin: .4rem 0; outline: none; }
.card:focus { border-color: #2f6fde; box-shadow: 0 0 0 3px #2f6fde33; }
.card.dragging { opacity: .5; }
.card.tied { margin-top: -.2rem; border-top: 2px dashed #b07a00; }
.handle { cursor: grab; user-select: none; touch-action: none; min-width: 3.2rem; text-align: center;
          font-weight: 700; font-size: 1.2rem; color: #2f6fde; }
.tools button { display: block; margin: .15rem 0; font-size: .8rem; }
.body { flex: 1; min-width: 0; }
.ab { display: grid; grid-template-columns: 1fr 1fr; gap: .8rem; }
.scale { display: flex; gap: .4rem; flex-wrap: wrap; margin: .6rem 0; }
.scale label { border: 1px solid #aab; border-radius: 6px; padding: .3rem .6rem; cursor: pointer; background: #fff; }
.scale input:checked + span { font-weight: 700; color: #2f6fde; }
button.primary { background: #2f6fde; color: #fff; border: 0; border-radius: 6px; padding: .55rem 1.2rem;
                 font-size: 1rem; cursor: pointer; }
button:disabled { opacity: .5; cursor: default; }
#message { min-height: 1.3rem; }
.error { color: #b00020; } .ok { color: #11703a; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; }
th, td { border-bottom: 1px solid #e3e6ea; padding: .25rem .4rem; text-align: left; }
textarea { width: 100%; min-height: 7rem; font: inherit; }
.help { color: #5a6270; font-size: .85rem; }
</style>
</head>
<body>
<header><h1>alignflow labeling</h1><span id="who"></span><span id="progress" aria-live="polite"></span></header>
<main>
  <div id="message" role="status"></div>
  <section id="login" class="box" hidden>
    <p>Open the personal link you were given (it ends in <code>#token=...</code>), or paste your token:</p>
    <input id="token-input" type="password" size="50" aria-label="token"> <button id="token-go">Sign in</button>
  </section>
  <section id="batches" class="box" hidden><h2>Batches</h2><div id="batch-list"></div></section>
  <section id="labeling" hidden>
    <div class="box"><h2>Instructions</h2><div id="instructions"></div></div>
    <div class="box"><h2>Prompt</h2><div id="prompt" class="text"></div></div>
    <div id="rank-mode" hidden>
      <p class="help">Best at the top. Drag a response by its number, or focus it (Tab) and press
      <kbd>Alt</kbd>+<kbd>&uarr;</kbd>/<kbd>&darr;</kbd> to move it, <kbd>T</kbd> to tie it with the one above.</p>
      <div id="ranking" role="list"></div>
    </div>
    <div id="ab-mode" hidden>
      <div class="ab"><div class="box"><h3>A</h3><div id="resp-a" class="text"></div></div>
                      <div class="box"><h3>B</h3><div id="resp-b" class="text"></div></div></div>
      <p class="help">Which response is better? If they are about the same or you are unsure, pick
      "about the same" or the smallest A or B. Keys 1-7 choose.</p>
      <div class="scale" id="scale" role="radiogroup"></div>
    </div>
    <div id="demo-box" class="box" hidden>
      <h3>Your response</h3><p class="help">Write the response you would want for this prompt.</p>
      <textarea id="demonstration" aria-label="your response"></textarea>
    </div>
    <p><button id="submit" class="primary">Submit</button> <button id="replace" hidden>Replace my earlier answer</button></p>
  </section>
  <section id="done" class="box" hidden><h2>All done</h2><p>Nothing left to label in this batch. Thank you!</p></section>
  <section id="admin" hidden>
    <div class="box"><h2>Admin</h2><div id="admin-batches"></div>
      <p><input id="invite-name" placeholder="labeler name" aria-label="labeler name"> <button id="invite">Invite</button>
      <span id="invite-link"></span></p></div>
    <div class="box" id="report" hidden><h2>Report <span id="report-batch"></span></h2><div id="report-body"></div></div>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const SCALE = [[-3, "A much better"], [-2, "A better"], [-1, "A slightly better"], [0, "About the same"],
               [1, "B slightly better"], [2, "B better"], [3, "B much better"]];
let token = null, batchId = null, item = null, cards = [], idemKey = null, busy = false;

function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls; return e; }
function show(id, on) { $(id).hidden = !on; }
function say(text, cls) { const m = $("message"); m.textContent = text || ""; m.className = cls || ""; }

/* Text with ``` fences: code in <pre>, the rest as paragraphs; never parsed as HTML. */
function renderText(container, text) {
  container.replaceChildren();
  const parts = String(text).split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 1) { const pre = el("pre"); const code = el("code", part.replace(/^[^\n]*\n/, ""));
      pre.appendChild(code); container.appendChild(pre); }
    else if (part.trim()) { container.appendChild(el("p", part.trim())); }
  });
}

async function api(method, path, data) {
  const opts = { method, headers: { "Authorization": "Bearer " + token } };
  if (data !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(data); }
  const resp = await fetch(path, opts);
  let body = null; try { body = await resp.json(); } catch (e) { body = null; }
  return { status: resp.status, body };
}

async function start() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) { sessionStorage.setItem("alignflow-token", decodeURIComponent(m[1]));
           history.replaceState(null, "", location.pathname + location.search); }
  token = sessionStorage.getItem("alignflow-token");
  if (!token) { show("login", true); return; }
  const r = await api("GET", "/api/me");
  if (r.status !== 200) { sessionStorage.removeItem("alignflow-token"); show("login", true);
    say((r.body && r.body.error) || "sign-in failed", "error"); return; }
  $("who").textContent = r.body.name + (r.body.is_admin ? " (admin)" : "");
  const list = $("batch-list"); list.replaceChildren();
  r.body.batches.forEach((b) => {
    const btn = el("button", b.name + " (" + b.progress.done + " of " + b.progress.total + ")");
    btn.dataset.batch = b.id; btn.onclick = () => openBatch(b.id); list.appendChild(btn); list.appendChild(el("span", " "));
  });
  show("batches", true);
  if (r.body.is_admin) { show("admin", true); loadAdmin(); }
  const wanted = new URLSearchParams(location.search).get("batch");
  if (wanted) openBatch(wanted); else if (r.body.batches.length === 1 && !r.body.is_admin) openBatch(r.body.batches[0].id);
}

async function openBatch(id) { batchId = id; await loadNext(); }

async function loadNext() {
  say(""); show("replace", false);
  const r = await api("GET", "/api/batches/" + encodeURIComponent(batchId) + "/next");
  if (r.status !== 200) { say((r.body && r.body.error) || ("error " + r.status), "error"); return; }
  const p = r.body.progress;
  $("progress").textContent = p ? (Math.min(p.done + (r.body.done ? 0 : 1), p.total) + " of " + p.total) : "";
  if (r.body.done) { show("labeling", false); show("done", true); item = null; return; }
  item = r.body; idemKey = (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) + Date.now());
  show("done", false); show("labeling", true);
  $("instructions").textContent = item.instructions || "Rank the responses from best to worst.";
  renderText($("prompt"), item.prompt);
  const ab = item.responses.length === 2;
  show("rank-mode", !ab); show("ab-mode", ab);
  show("demo-box", !!item.demonstrations); $("demonstration").value = "";
  if (ab) buildScale(); else buildRanking();
}

function buildScale() {
  renderText($("resp-a"), item.responses[0].text); renderText($("resp-b"), item.responses[1].text);
  const s = $("scale"); s.replaceChildren();
  SCALE.forEach(([v, label], i) => {
    const l = el("label"); const input = el("input"); input.type = "radio"; input.name = "ab"; input.value = v;
    input.id = "ab" + v; l.appendChild(input); l.appendChild(el("span", " " + (i + 1) + ". " + label)); s.appendChild(l);
  });
}

function buildRanking() {
  cards = item.responses.map((r) => ({ id: r.id, text: r.text, tie: false }));
  drawRanking();
}

function groups() {
  const out = [];
  cards.forEach((c, i) => { if (i > 0 && c.tie) out[out.length - 1].push(c.id); else out.push([c.id]); });
  return out;
}

function drawRanking(focusId) {
  const box = $("ranking"); box.replaceChildren();
  let rank = 0;
  cards.forEach((c, i) => {
    if (i === 0) c.tie = false;
    if (!c.tie) rank = i + 1;
    const card = el("div", undefined, "card" + (c.tie ? " tied" : "")); card.tabIndex = 0; card.dataset.id = c.id;
    card.setAttribute("role", "listitem");
    card.setAttribute("aria-label", "rank " + rank + (c.tie ? " (tied)" : ""));
    const handle = el("div", "#" + rank + (c.tie ? "=" : ""), "handle"); handle.title = "drag to move";
    const tools = el("div", undefined, "tools");
    const up = el("button", "\u25B2"); up.title = "move up"; up.onclick = () => move(c.id, -1);
    const down = el("button", "\u25BC"); down.title = "move down"; down.onclick = () => move(c.id, 1);
    const tie = el("button", c.tie ? "untie" : "tie \u2191"); tie.title = "tie with the response above";
    tie.onclick = () => toggleTie(c.id); tie.disabled = i === 0;
    tools.append(up, down, tie);
    const body = el("div", undefined, "body text"); renderText(body, c.text);
    card.append(handle, body, tools);
    card.addEventListener("keydown", (e) => onKey(e, c.id));
    handle.addEventListener("pointerdown", (e) => startDrag(e, card, c.id));
    box.appendChild(card);
  });
  if (focusId) { const f = box.querySelector('[data-id="' + CSS.escape(focusId) + '"]'); if (f) f.focus(); }
}

function move(id, delta) {
  const i = cards.findIndex((c) => c.id === id), j = i + delta;
  if (j < 0 || j >= cards.length) return;
  [cards[i], cards[j]] = [cards[j], cards[i]]; drawRanking(id);
}
function toggleTie(id) { const c = cards.find((x) => x.id === id); c.tie = !c.tie; drawRanking(id); }

function onKey(e, id) {
  const i = cards.findIndex((c) => c.id === id);
  if ((e.altKey || e.shiftKey) && e.key === "ArrowUp") { e.preventDefault(); move(id, -1); }
  else if ((e.altKey || e.shiftKey) && e.key === "ArrowDown") { e.preventDefault(); move(id, 1); }
  else if (e.key === "ArrowUp" && i > 0) { e.preventDefault(); $("ranking").children[i - 1].focus(); }
  else if (e.key === "ArrowDown" && i < cards.length - 1) { e.preventDefault(); $("ranking").children[i + 1].focus(); }
  else if (e.key === "t" || e.key === "T") { e.preventDefault(); toggleTie(id); }
}

/* Pointer-based dragging (mouse, pen, touch): the card follows the pointer's position among the others. */
function startDrag(e, card, id) {
  e.preventDefault(); card.classList.add("dragging");
  const onMove = (ev) => {
    const over = document.elementFromPoint(ev.clientX, ev.clientY);
    const target = over && over.closest(".card");
    if (!target || target.dataset.id === id) return;
    const from = cards.findIndex((c) => c.id === id), to = cards.findIndex((c) => c.id === target.dataset.id);
    const [c] = cards.splice(from, 1); cards.splice(to, 0, c); drawRanking();
    $("ranking").querySelector('[data-id="' + CSS.escape(id) + '"]').classList.add("dragging");
  };
  const onUp = () => { document.removeEventListener("pointermove", onMove); document.removeEventListener("pointerup", onUp);
    drawRanking(id); };
  document.addEventListener("pointermove", onMove); document.addEventListener("pointerup", onUp);
}

document.addEventListener("keydown", (e) => {
  if (!item || item.responses.length !== 2 || e.target.tagName === "TEXTAREA" || e.target.tagName === "INPUT") return;
  const n = parseInt(e.key, 10);
  if (n >= 1 && n <= 7) { $("ab" + SCALE[n - 1][0]).checked = true; }
});

async function submit(replace) {
  if (busy || !item) return;
  const payload = { item_id: item.item_id, idempotency_key: idemKey, replace: !!replace };
  if (item.responses.length === 2) {
    const picked = document.querySelector('input[name="ab"]:checked');
    if (!picked) { say("Choose a point on the A/B scale first.", "error"); return; }
    payload.ab = parseInt(picked.value, 10);
  } else { payload.ranking = groups(); }
  if (item.demonstrations) payload.demonstration = $("demonstration").value;
  busy = true; $("submit").disabled = true;
  try {
    const r = await api("POST", "/api/submissions", payload);
    if (r.status === 201 || r.status === 200) { say(r.body.revision > 1 ? "Replaced your earlier answer." : "Saved.", "ok");
      await loadNext(); }
    else if (r.status === 409 && !replace) { say(r.body.error, "error"); show("replace", true);
      idemKey = crypto.randomUUID ? crypto.randomUUID() : idemKey + "-r"; }
    else { say((r.body && r.body.error) || ("error " + r.status), "error"); }
  } catch (err) { say("Network error: your answer is kept, press Submit again.", "error"); }
  finally { busy = false; $("submit").disabled = false; }
}

async function loadAdmin() {
  const r = await api("GET", "/api/admin/batches");
  if (r.status !== 200) return;
  const t = el("table"); const h = el("tr");
  ["batch", "items", "gold", "submissions", "complete", ""].forEach((x) => h.appendChild(el("th", x))); t.appendChild(h);
  r.body.forEach((b) => {
    const tr = el("tr");
    [b.name, b.items, b.gold_items, b.submissions, b.complete_items + " of " + (b.items - b.gold_items)]
      .forEach((x) => tr.appendChild(el("td", String(x))));
    const td = el("td"); const rep = el("button", "report"); rep.onclick = () => loadReport(b.id);
    const exp = el("button", "export"); exp.className = "export"; exp.dataset.batch = b.id; exp.onclick = () => exportBatch(b.id);
    td.append(rep, exp); tr.appendChild(td); t.appendChild(tr);
  });
  $("admin-batches").replaceChildren(t);
}

async function exportBatch(id) {
  const r = await api("GET", "/api/admin/batches/" + encodeURIComponent(id) + "/export");
  const blob = new Blob([JSON.stringify(r.body, null, 1)], { type: "application/json" });
  const a = el("a", "export-" + id + ".json"); a.href = URL.createObjectURL(blob); a.download = "export-" + id + ".json";
  a.id = "export-link"; $("invite-link").replaceChildren(a); say("Exported " + r.body.length + " submissions.", "ok");
}

function fmt(v, d) { return v === null || v === undefined ? "-" : (typeof v === "number" ? v.toFixed(d) : String(v)); }

async function loadReport(id) {
  $("report-batch").textContent = id; show("report", true); $("report-body").textContent = "computing...";
  const r = await api("GET", "/api/admin/batches/" + encodeURIComponent(id) + "/report");
  if (r.status !== 200) { $("report-body").textContent = r.body.error; return; }
  const b = r.body, out = $("report-body"); out.replaceChildren();
  out.appendChild(el("h3", "Policy leaderboard (Bradley-Terry, Elo scale, 95% bootstrap interval)"));
  const t = el("table"); const h = el("tr");
  ["rank", "policy", "score", "95% interval", "comparisons", "P(better than next)", "distinguishable"]
    .forEach((x) => h.appendChild(el("th", x))); t.appendChild(h);
  b.leaderboard.rows.forEach((row) => { const tr = el("tr");
    [row.rank, row.item, fmt(row.score, 0), fmt(row.low, 0) + " .. " + fmt(row.high, 0), row.comparisons,
     fmt(row.p_better_than_next, 2), row.distinguishable_from_next === undefined ? "" : (row.distinguishable_from_next ? "yes" : "no")]
      .forEach((x) => tr.appendChild(el("td", String(x)))); t.appendChild(tr); });
  out.appendChild(t);
  out.appendChild(el("h3", "Agreement"));
  out.appendChild(el("p", "pairwise agreement " + fmt(b.agreement.pairwise, 3) + " over " + b.agreement.judgements +
    " judgements; Krippendorff's alpha " + fmt(b.agreement.krippendorff_alpha, 3)));
  const q = el("table"); const qh = el("tr");
  ["labeler", "submissions", "agreement with others", "gold accuracy", "gold items"].forEach((x) => qh.appendChild(el("th", x)));
  q.appendChild(qh);
  b.labeler_quality.forEach((row) => { const tr = el("tr");
    [row.labeler, row.submissions, fmt(row.agreement_with_others, 3), fmt(row.gold_accuracy, 3), row.gold_items]
      .forEach((x) => tr.appendChild(el("td", String(x)))); q.appendChild(tr); });
  out.appendChild(q);
  const over = b.agreement_over_time || {};
  if (Object.keys(over).length) {
    out.appendChild(el("h3", "Agreement with the others over time (windows of submissions)"));
    Object.keys(over).sort().forEach((who) => out.appendChild(el("p", who + ": " +
      over[who].map((w) => fmt(w.agreement, 2) + " (" + w.n + ")").join(" \u2192 "))));
  }
}

$("submit").onclick = () => submit(false);
$("replace").onclick = () => submit(true);
$("invite").onclick = async () => {
  const r = await api("POST", "/api/admin/labelers", { name: $("invite-name").value });
  if (r.status !== 201) { say(r.body.error, "error"); return; }
  $("invite-link").textContent = location.origin + "/#token=" + r.body.token;
};
$("token-go").onclick = () => { sessionStorage.setItem("alignflow-token", $("token-input").value.trim()); location.reload(); };
start();
</script>
</body>
</html>
"""
