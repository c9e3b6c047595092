// The little the pages need: line numbers, and Validate / Dry run / Save in the rules editor.
// Every change is sent with the session's CSRF token (the meta tag), as the server requires.
const nnrouter = {
  csrf() { return document.querySelector('meta[name="csrf-token"]').content; },
  async call(method, url, body) {
    const r = await fetch(url, {
      method, credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": nnrouter.csrf()},
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    return {ok: r.ok, status: r.status, data};
  },
  goto(text, line, column) {
    // Put the cursor where the problem is, and bring that line into view.
    if (!line) return;
    const lines = text.value.split("\n");
    let at = 0;
    for (let i = 0; i < line - 1 && i < lines.length; i++) at += lines[i].length + 1;
    at += Math.max(0, (column || 1) - 1);
    text.focus();
    text.setSelectionRange(at, at);
    text.scrollTop = Math.max(0, (line - 5) * parseFloat(getComputedStyle(text).lineHeight));
  },
  editor() {
    const text = document.getElementById("text"), gutter = document.getElementById("gutter");
    const kind = text.dataset.kind, result = document.getElementById("result");
    const problems = document.getElementById("problems");
    const numbers = () => {
      const n = text.value.split("\n").length;
      gutter.textContent = Array.from({length: n}, (_, i) => i + 1).join("\n");
      gutter.scrollTop = text.scrollTop;
    };
    text.addEventListener("input", numbers);
    text.addEventListener("scroll", () => { gutter.scrollTop = text.scrollTop; });
    numbers();
    for (const li of problems.querySelectorAll("li")) li.onclick = () => nnrouter.goto(text, +li.dataset.line, 1);
    const show = (list) => {
      problems.innerHTML = "";
      for (const p of list || []) {
        const li = document.createElement("li");
        li.dataset.line = p.line;
        li.textContent = `line ${p.line}, column ${p.column}: ${p.field || "(top level)"}: ${p.reason}`;
        li.onclick = () => nnrouter.goto(text, p.line, p.column);
        problems.appendChild(li);
      }
    };
    const say = (msg, ok) => { result.textContent = msg; result.className = "result " + (ok ? "ok" : "bad"); };
    document.getElementById("check").onclick = async () => {
      const r = await nnrouter.call("POST", `/api/rules/${kind}/check`, {text: text.value});
      show(r.data && r.data.problems);
      say(r.ok && r.data.ok ? "valid" : `${(r.data && r.data.problems || []).length} problem(s)`, r.ok && r.data.ok);
    };
    const dry = document.getElementById("dryrun");
    if (dry) dry.onclick = async () => {
      const uid = document.getElementById("study").value;
      const r = await nnrouter.call("POST", "/api/rules/rules/dryrun", uid ? {text: text.value, study_uids: [uid]} : {text: text.value});
      const table = document.getElementById("dryrun-table"), body = table.querySelector("tbody");
      body.innerHTML = "";
      if (!r.ok) { show(r.data && r.data.detail && r.data.detail.problems); say("the edited rules do not load", false); return; }
      show([]);
      const fmt = (o) => o ? (o.discard ? "discard" : (o.destinations.join(", ") || "nothing") + (o.hold ? " (held)" : "")) : "";
      for (const s of r.data.studies) {
        const tr = document.createElement("tr");
        if (s.changed) tr.className = "changed";
        for (const v of [s.study_uid, s.accession_number || "", fmt(s.now), fmt(s.edited), s.changed ? "CHANGED" : ""]) {
          const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
        }
        body.appendChild(tr);
      }
      table.classList.remove("hidden");
      say(`${r.data.changed} of ${r.data.studies.length} studies would change`, true);
    };
    const save = document.getElementById("save");
    if (save) save.onclick = async () => {
      const comment = document.getElementById("comment").value;
      const r = await nnrouter.call("PUT", `/api/rules/${kind}`, {text: text.value, comment, base_digest: text.dataset.digest});
      if (r.ok) {
        show([]);
        text.dataset.digest = r.data.version.digest;
        say(r.data.saved ? `saved as version ${r.data.version.id}; the router loads it on its next tick` : "no change", true);
      }
      else { show(r.data && r.data.detail && r.data.detail.problems); say(r.status === 422 ? "not saved: fix the problems first" : `not saved: ${r.data && r.data.detail}`, false); }
    };
  },
};
