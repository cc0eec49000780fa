// The Ambit dashboard page: draws the model the server sends over server-sent events.
// Why this shape: the server does every decision (model.py); the page only renders, so one
// model gives the same picture in every open page. Each update changes the graph in place
// (elements added, removed or given new data) and reruns the layout only when the set of
// workloads changed, so the picture does not jump every second. Text from the mesh (names,
// labels, reasons) is only ever set as textContent, never parsed as HTML.
"use strict";

(function () {
  const cy = cytoscape({
    container: document.getElementById("cy"),
    style: [
      { selector: "node", style: {
        "label": "data(label)", "text-wrap": "wrap", "font-size": 11,
        "text-valign": "bottom", "text-margin-y": 4, "background-color": "#4a79c9",
        "width": 28, "height": 28, "border-width": 2, "border-color": "#2f5597" } },
      { selector: "node.namespace", style: {
        "background-color": "#eef1f5", "border-color": "#b6bfcc", "border-width": 1,
        "text-valign": "top", "font-weight": 600, "color": "#4b5566", "shape": "round-rectangle",
        "padding": 18 } },
      { selector: "node.waypoint", style: { "shape": "diamond", "background-color": "#7a4ac9",
        "border-color": "#4f2d8a", "width": 34, "height": 34 } },
      { selector: "node.service", style: { "shape": "round-rectangle",
        "background-color": "#9aa5b5", "border-color": "#6d7889" } },
      { selector: "node.external", style: { "background-color": "#c4c9d1",
        "border-color": "#8b93a1" } },
      { selector: "node.nocap", style: { "border-color": "#e08a00", "border-width": 5 } },
      { selector: "node:selected", style: { "overlay-opacity": 0.15 } },
      { selector: "edge", style: {
        "curve-style": "bezier", "target-arrow-shape": "triangle", "label": "data(label)",
        "font-size": 10, "text-background-color": "#fff", "text-background-opacity": 0.85,
        "text-rotation": "autorotate", "text-margin-y": -8, "line-color": "#4a79c9",
        "target-arrow-color": "#4a79c9", "width": "data(width)" } },
      { selector: "edge.http", style: { "line-style": "dashed", "line-color": "#7a4ac9",
        "target-arrow-color": "#7a4ac9" } },
      { selector: "edge.idle", style: { "opacity": 0.55 } },
      { selector: "edge.denied", style: { "line-color": "#d0342c",
        "target-arrow-color": "#d0342c", "color": "#a1221b" } },
    ],
    layout: { name: "preset" },
  });
  window.ambitGraph = cy;  // for the browser tests and the curious
  window.ambitModel = null;

  let layoutKey = "";
  const $ = (id) => document.getElementById(id);

  function fmt(n, digits) {
    if (n === null || n === undefined) return "–";
    if (typeof n !== "number") return String(n);
    if (Math.abs(n) >= 1e9) return (n / 1e9).toFixed(1) + "G";
    if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
    return Number.isInteger(n) ? String(n) : n.toFixed(digits === undefined ? 2 : digits);
  }
  function pct(x) { return x ? (100 * x).toFixed(1) + "%" : "0%"; }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const u = ["B", "KiB", "MiB", "GiB"]; let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + u[i];
  }
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function link(href, text) {
    const a = el("a", text || "raw"); a.href = href; a.target = "_blank"; a.rel = "noopener";
    return a;
  }
  function row(cells, cls) {
    const tr = el("tr", null, cls);
    for (const c of cells) {
      const td = el("td");
      if (c instanceof Node) td.appendChild(c); else td.textContent = c === null || c === undefined ? "–" : String(c);
      tr.appendChild(td);
    }
    return tr;
  }
  function fill(tableId, rows) {
    const body = $(tableId).querySelector("tbody");
    body.replaceChildren(...rows);
  }

  // --- graph -------------------------------------------------------------------------------

  function edgeLabel(e) {
    const parts = [];
    if (e.mtls) parts.push("mTLS");
    if (e.kind === "tcp") parts.push(fmt(e.connections) + " conn");
    else parts.push(fmt(e.requests) + " req");
    if (e.rate) parts.push(fmt(e.rate) + "/s");
    if (e.denied > 0) {
      parts.push("denied " + fmt(e.denied) + (e.deniedBy && e.deniedBy.length ? " by " + e.deniedBy.join(", ") : ""));
    } else if (e.errorShare > 0) {
      parts.push(pct(e.errorShare) + " err");
    }
    return parts.join(" ");
  }

  function elements(m) {
    const out = [];
    const namespaces = new Set();
    for (const w of m.workloads) {
      if (w.namespace) namespaces.add(w.namespace);
      const cls = [w.kind];
      if (w.captured === false && w.kind === "workload") cls.push("nocap");
      let label = w.name + (w.node ? "\n" + w.node : "");
      if (w.kind === "waypoint") label = "waypoint " + (w.gateway || w.name) + (w.node ? "\n" + w.node : "");
      if (w.captured === false && w.kind === "workload") label += "\nnot captured";
      out.push({ group: "nodes", data: { id: "w:" + w.id, label: label, parent: w.namespace ? "ns:" + w.namespace : undefined, ref: w.id }, classes: cls.join(" ") });
    }
    for (const ns of namespaces) {
      out.push({ group: "nodes", data: { id: "ns:" + ns, label: "namespace " + ns }, classes: "namespace" });
    }
    for (const e of m.edges) {
      const cls = [e.kind];
      if (e.denied > 0 && e.denied >= (e.kind === "tcp" ? e.connections : e.requests)) cls.push("denied");
      else if (e.denied > 0) cls.push("denied");
      if (!e.active) cls.push("idle");
      const width = 1.5 + Math.min(5, Math.log10(1 + (e.rate || 0)) * 2);
      out.push({ group: "edges", data: { id: "e:" + e.id, source: "w:" + e.source, target: "w:" + e.target, label: edgeLabel(e), width: width, ref: e.id, denied: e.denied, mtls: e.mtls, deniedBy: (e.deniedBy || []).join(",") }, classes: cls.join(" ") });
    }
    return out;
  }

  function updateGraph(m) {
    const want = elements(m);
    const ids = new Set(want.map((x) => x.data.id));
    cy.batch(() => {
      cy.elements().forEach((x) => { if (!ids.has(x.id())) x.remove(); });
      for (const x of want.filter((x) => x.group === "nodes" && x.classes === "namespace").concat(want.filter((x) => !(x.group === "nodes" && x.classes === "namespace")))) {
        const have = cy.getElementById(x.data.id);
        if (have.nonempty()) {
          have.data(x.data);
          have.classes(x.classes);
        } else {
          cy.add(x);
        }
      }
    });
    const key = want.filter((x) => x.group === "nodes").map((x) => x.data.id).sort().join("|");
    if (key !== layoutKey) {
      layoutKey = key;
      cy.layout({ name: "cose", animate: false, randomize: false, nodeRepulsion: 40000,
                  idealEdgeLength: 180, nodeOverlap: 40, padding: 30, fit: true }).run();
    }
  }

  function showDetails(kind, ref) {
    const m = window.ambitModel; if (!m) return;
    const box = $("details");
    const dl = el("dl");
    const add = (k, v) => { dl.appendChild(el("dt", k)); const dd = el("dd"); if (v instanceof Node) dd.appendChild(v); else dd.textContent = v === null || v === undefined ? "–" : String(v); dl.appendChild(dd); };
    if (kind === "node") {
      const w = m.workloads.find((x) => x.id === ref); if (!w) return;
      add("workload", w.id); add("kind", w.kind); add("identity", w.identity);
      add("app / version", (w.app || "–") + " / " + (w.version || "–"));
      for (const p of w.pods || []) {
        add("pod " + p.name, p.node + " " + (p.ips || []).join(",") + " — " + (p.captured === null ? "capture unknown" : p.captured ? "captured" : "NOT captured") + (p.reason ? " (" + p.reason + ")" : ""));
      }
      if (w.raw) add("raw", link(w.raw, "ztunnel config_dump"));
    } else {
      const e = m.edges.find((x) => x.id === ref); if (!e) return;
      add("edge", e.source + " → " + e.target); add("layer", e.kind === "tcp" ? "L4 (ztunnel)" : "L7 (waypoint " + e.waypoint + ")");
      add("mTLS", e.mtls ? "yes" : "no");
      if (e.kind === "tcp") { add("connections", fmt(e.connections)); add("bytes", bytes(e.bytes)); }
      else { add("requests", fmt(e.requests)); add("codes", JSON.stringify(e.codes)); add("clients", (e.clients || []).map((c) => c.id + " (" + fmt(c.requests) + ")").join(", ")); }
      add("rate", e.rate === null ? "–" : fmt(e.rate) + "/s"); add("error share", pct(e.errorShare));
      add("denied", fmt(e.denied)); if (e.deniedBy && e.deniedBy.length) add("denied by", e.deniedBy.join(", "));
    }
    box.replaceChildren(dl);
  }
  let selected = null;
  cy.on("tap", "node", (evt) => { const r = evt.target.data("ref"); if (r) { selected = ["node", r]; showDetails("node", r); } });
  cy.on("tap", "edge", (evt) => { selected = ["edge", evt.target.data("ref")]; showDetails("edge", selected[1]); });

  // --- tables ------------------------------------------------------------------------------

  function updateTables(m) {
    fill("edges", m.edges.map((e) => row([
      e.source, e.target, e.kind === "tcp" ? "L4" : "L7 via " + e.waypoint, e.mtls ? "mTLS" : "plaintext",
      e.kind === "tcp" ? fmt(e.connections) + " conn" : fmt(e.requests) + " req",
      e.rate === null ? "–" : fmt(e.rate), e.kind === "tcp" ? bytes(e.bytes) : "–", pct(e.errorShare),
      fmt(e.denied), (e.deniedBy || []).join(", ") || (e.denied > 0 ? "(waypoint policy)" : ""),
    ], e.denied > 0 ? "denied" : "")));
    fill("workloads", m.workloads.filter((w) => w.kind !== "external" && w.kind !== "service").map((w) => {
      const why = (w.pods || []).map((p) => p.reason).filter((x) => x).join("; ");
      return row([w.id, w.kind, (w.nodes || []).join(", "), (w.pods || []).length, w.identity,
        w.captured === null ? "unknown" : w.captured ? "captured" : "not captured", why,
        w.raw ? link(w.raw) : "–"], w.captured === false && w.kind === "workload" ? "nocap" : "");
    }));
    fill("policies", m.policies.map((p) => row([p.namespace + "/" + p.name, p.action, p.enforcedBy,
      (p.selects || []).join(", ") || "(none)", p.allowed === null ? "–" : fmt(p.allowed),
      p.denied === null ? "–" : fmt(p.denied), link(p.raw)])));
    fill("peerauth", m.peerAuthentications.map((p) => row([p.namespace + "/" + p.name, p.mode,
      p.selector ? JSON.stringify(p.selector) : "(namespace)", link(p.raw)])));
    fill("waypoints", m.waypoints.map((w) => row([w.namespace + "/" + w.name, w.pod, w.node,
      (w.services || []).join(", ") || "(none)", link(w.raw, "metrics")])));
    fill("routes", m.routes.map((r) => row([r.namespace + "/" + r.name,
      r.parents.map((p) => p.kind + "/" + p.name).join(", "),
      r.parents.map((p) => p.waypoint || "–").join(", "), r.backends.join(", "), r.rules, link(r.raw)])));
    const nodes = m.nodes.map((n) => {
      const card = el("div", null, "node-card");
      card.appendChild(el("h3", n.name));
      const feed = n.stateFeed || {};
      const lines = [
        ["agent", (n.agentVersion || "?") + ", " + (n.agentReady || "?") + (n.lastError ? ", last error: " + n.lastError : "")],
        ["redirect mode", (n.redirectMode || "?") + (n.redirectModeReason ? " (" + n.redirectModeReason + ")" : "")],
        ["state feed", (feed.connected === null ? "unknown" : feed.connected ? "connected" : "DISCONNECTED") + ", version " + (feed.version || "?") + (feed.ageSeconds !== undefined && feed.ageSeconds !== null ? ", " + fmt(feed.ageSeconds, 1) + " s old" : "")],
        ["ztunnel connections", fmt(n.connections)],
        ["RSS", "agent " + bytes(n.rss.agent) + ", ztunnel " + bytes(n.rss.ztunnel)],
        ["CPU", "agent " + (n.cpu && n.cpu.agent !== null && n.cpu.agent !== undefined ? (100 * n.cpu.agent).toFixed(1) + "%" : "–") + ", ztunnel " + (n.cpu && n.cpu.ztunnel !== null && n.cpu.ztunnel !== undefined ? (100 * n.cpu.ztunnel).toFixed(1) + "%" : "–")],
      ];
      const dl = el("dl");
      for (const [k, v] of lines) { dl.appendChild(el("dt", k)); dl.appendChild(el("dd", v, k === "state feed" && feed.connected === false ? "bad" : "")); }
      card.appendChild(dl);
      const t = el("table"); t.appendChild(row(["pod", "IPs", "captured", "why"]));
      for (const p of n.pods) t.appendChild(row([p.pod, (p.ips || []).join(","), p.captured ? "captured" : "not captured", p.reason], p.captured ? "" : "nocap"));
      card.appendChild(t);
      const c = el("table"); c.appendChild(row(["certificate", "expires", "in"]));
      for (const x of n.certificates) c.appendChild(row([x.identity, x.expires, x.expiresInSeconds === null ? "–" : fmt(x.expiresInSeconds / 3600, 1) + " h"]));
      card.appendChild(c);
      const raw = el("p"); raw.appendChild(el("span", "raw: "));
      for (const [k, href] of Object.entries(n.raw)) { raw.appendChild(link(href, k)); raw.appendChild(el("span", " ")); }
      card.appendChild(raw);
      for (const [k, v] of Object.entries(n.errors || {})) card.appendChild(el("p", k + ": " + v, "bad"));
      return card;
    });
    $("nodes").replaceChildren(...nodes);
    $("problems").replaceChildren(...m.problems.map((p) => el("li", p)));
    $("problem-count").textContent = m.problems.length ? "(" + m.problems.length + ")" : "";
    $("source").textContent = m.source;
    $("updated").textContent = "updated " + new Date(m.at * 1000).toLocaleTimeString();
  }

  function render(m) {
    window.ambitModel = m;
    updateTables(m);
    updateGraph(m);
    if (selected) showDetails(selected[0], selected[1]);
    document.body.dataset.gather = String(m.gather);
  }

  // --- tabs and the live feed -------------------------------------------------------------

  function showTab() {
    const tab = (location.hash || "#graph").slice(1);
    for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== "tab-" + tab;
    for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.tab === tab);
    if (tab === "graph") cy.resize();
  }
  window.addEventListener("hashchange", showTab);
  showTab();

  const status = $("status");
  function connect() {
    const es = new EventSource("/api/events");
    es.addEventListener("open", () => { status.textContent = "live"; status.className = "status live"; });
    es.addEventListener("model", (ev) => { render(JSON.parse(ev.data)); });
    es.addEventListener("error", () => { status.textContent = "disconnected, retrying"; status.className = "status disconnected"; });
  }
  connect();
})();
