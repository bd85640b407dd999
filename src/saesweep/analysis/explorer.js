// The results explorer's controls, over plotly.js's API (analysis/explorer.py writes this file,
// plotly.min.js and the sweep's data, element #explorer-data, into one page). The selects choose
// what to plot; draw() rebuilds the traces and hands them to Plotly.react; the view is kept in the
// URL fragment (#site=…&metric=…), which is read back on load; the table sorts on a header click.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("explorer-data").textContent);
  const C = D.cells;
  const ALL = "all";
  const $ = (id) => document.getElementById(id);
  const unique = (values) => [...new Set(values.filter((v) => v !== null))];
  const PALETTE = D.palette;
  const SYMBOLS = ["circle", "square", "diamond", "triangle-up", "cross", "x", "star", "triangle-down", "pentagon", "hexagram"];
  const ARCHS = unique(C.arch).sort();  // each architecture's marker symbol: its place here
  const DASH = { "ok": "solid", "not resolved": "dash", "contradicted": "dot" };
  const SELECTS = ["site", "arch", "n", "curve", "metric", "x", "law"];
  const CHECKS = ["logx", "logy", "curves"];
  const table = { col: -1, desc: false };

  function fill(id, values, labels, withAll) {
    const select = $(id);
    const all = withAll ? [[ALL, "all"]] : [];
    for (const [value, label] of all.concat(values.map((v, i) => [String(v), labels ? labels[i] : String(v)]))) {
      select.add(new Option(label, value));
    }
  }

  function state() {
    const s = {};
    for (const id of SELECTS) s[id] = $(id).value;
    for (const id of CHECKS) s[id] = $(id).checked ? "1" : "0";
    s.sort = String(table.col);
    s.desc = table.desc ? "1" : "0";
    return s;
  }
  function restore(fragment) {
    const saved = new URLSearchParams(fragment);
    for (const id of SELECTS) {
      const value = saved.get(id);
      if (value !== null && [...$(id).options].some((o) => o.value === value)) $(id).value = value;
    }
    for (const id of CHECKS) if (saved.has(id)) $(id).checked = saved.get(id) === "1";
    if (saved.has("sort")) {
      table.col = Number(saved.get("sort"));
      table.desc = saved.get("desc") === "1";
    }
  }

  // The cells of the selection with a value on the chosen axis and metric (positive ones on log axes).
  function selected(s) {
    const xs = C.x[s.x], ys = C.y[s.metric];
    return C.name.map((_, i) => i).filter((i) =>
      C.site[i] === s.site && (s.arch === ALL || C.arch[i] === s.arch) &&
      (s.n === ALL || String(C.n[i]) === s.n) && (s.curve === ALL || C.curve[i] === s.curve) &&
      xs[i] !== null && ys[i] !== null && !(s.logx === "1" && xs[i] <= 0) && !(s.logy === "1" && ys[i] <= 0));
  }
  // Points are grouped into lines: per curve (arch and setting) over n, L0, tokens, FLOPs; per n over k.
  const lineOf = (s, arch, curve, n) => (s.x === "k" ? `${arch} n=${n}` : `${arch} ${curve}`);

  function traces(s) {
    const data = [], notes = [], colours = {};
    const colour = (key) => (colours[key] = colours[key] || PALETTE[Object.keys(colours).length % PALETTE.length]);
    const groups = {};
    for (const i of selected(s)) (groups[lineOf(s, C.arch[i], C.curve[i], C.n[i])] ||= []).push(i);
    for (const key of Object.keys(groups).sort()) {
      const idx = groups[key].sort((a, b) => C.x[s.x][a] - C.x[s.x][b]);
      const se = C.se[s.metric];
      data.push({
        type: "scatter", mode: "markers", name: key, legendgroup: key,
        x: idx.map((i) => C.x[s.x][i]), y: idx.map((i) => C.y[s.metric][i]),
        error_y: se ? { type: "data", array: idx.map((i) => se[i] ?? 0), visible: true, thickness: 1 } : undefined,
        customdata: idx.map((i) => [C.name[i], C.hash[i], C.commit[i]]),
        hovertemplate: "<b>%{customdata[0]}</b><br>settings hash %{customdata[1]}<br>commit %{customdata[2]}" +
          `<br>${s.x} = %{x}<br>${s.metric} = %{y}<extra></extra>`,
        marker: { color: colour(key), size: 8, symbol: SYMBOLS[ARCHS.indexOf(C.arch[idx[0]]) % SYMBOLS.length] },
      });
    }
    const curves = D.curves;
    if (s.curves === "1" && s.metric === D.curve_metric && curves.x[s.x]) {
      const chosen = new Set(selected(s));
      curves.cell.forEach((i, j) => {
        if (!chosen.has(i)) return;
        const key = lineOf(s, C.arch[i], C.curve[i], C.n[i]);
        data.push({ type: "scatter", mode: "lines", name: `${C.name[i]} during training`, legendgroup: key, showlegend: false,
          x: curves.x[s.x][j], y: curves.y[j], line: { color: colour(key), width: 1 }, opacity: 0.6,
          hovertemplate: `${C.name[i]}: held-out ${s.metric} during training<br>${s.x} = %{x}<br>%{y}<extra></extra>` });
      });
    }
    if (!data.length) notes.push(`No cell of this selection has a value of ${s.metric} on the axis ${s.x}.`);
    if ((s.x === "n" || s.x === "k") && s.law !== "none") {
      for (const law of D.laws) {
        if (law.site !== s.site || law.metric !== s.metric || law.x !== s.x) continue;
        if (s.arch !== ALL && law.arch !== s.arch) continue;
        if (s.x === "n" ? s.curve !== ALL && law.at !== s.curve : s.n !== ALL && law.at !== s.n) continue;
        if (s.law === "drawn" ? !law.drawn : law.form !== s.law) continue;
        const key = s.x === "k" ? `${law.arch} n=${law.at}` : `${law.arch} ${law.at}`;
        const label = `${key}: ${law.law}` + (law.status === "ok" ? "" : ` [${law.status}]`);
        if (law.status !== "ok") notes.push(`${label}: ${law.reason}`);
        if (!law.line) continue;
        const c = colour(key);
        if (law.status !== "contradicted") {
          data.push({ type: "scatter", mode: "lines", x: law.grid, y: law.lo, line: { width: 0 }, legendgroup: key, showlegend: false, hoverinfo: "skip" });
          data.push({ type: "scatter", mode: "lines", x: law.grid, y: law.hi, line: { width: 0 }, fill: "tonexty", fillcolor: c + (law.status === "ok" ? "33" : "1a"), legendgroup: key, showlegend: false, hoverinfo: "skip", name: `${label} 95% band` });
        }
        const params = Object.entries(law.params).map(([p, v]) => `${p} = ${v}`).join(", ");
        data.push({ type: "scatter", mode: "lines", name: label, legendgroup: key, x: law.grid, y: law.line,
          line: { color: c, dash: DASH[law.status] || "solid" }, hovertemplate: `${label}<br>${law.formula}<br>${params}<extra></extra>` });
      }
    }
    return { data, notes };
  }

  // The y range spans the points and lines, not the laws' bands: a band that is unbounded
  // or nearly so (a law not resolved) runs off the plot instead of flattening the points.
  function yRange(data, log) {
    const ys = data.filter((t) => t.hoverinfo !== "skip").flatMap((t) => t.y)
      .filter((y) => y !== null && (log !== "1" || y > 0)).map((y) => (log === "1" ? Math.log10(y) : y));
    if (!ys.length) return undefined;
    const lo = Math.min(...ys), hi = Math.max(...ys), pad = 0.08 * (hi - lo || Math.abs(hi) || 1);
    return [lo - pad, hi + pad];
  }

  function draw() {
    const s = state();
    const { data, notes } = traces(s);
    const axis = (log, title) => ({ type: log === "1" ? "log" : "linear", title: { text: title } });
    Plotly.react("plot", data, {
      title: { text: `run ${D.run} · ${s.site} · ${s.metric}` },
      xaxis: axis(s.logx, D.axes[s.x]), yaxis: { ...axis(s.logy, s.metric), range: yRange(data, s.logy) },
      hovermode: "closest", margin: { t: 40 }, legend: { font: { size: 11 } },
    }, { displaylogo: false, responsive: true });
    $("notes").replaceChildren(...notes.map((text) => Object.assign(document.createElement("li"), { textContent: text })));
    const fragment = new URLSearchParams(s).toString();
    history.replaceState(null, "", "#" + fragment);
    $("view").textContent = "#" + fragment;
  }

  function sortTable() {
    const body = $("matched").tBodies[0];
    const rows = D.table.rows.slice();
    if (table.col >= 0) {
      const key = (row) => row[table.col];
      rows.sort((a, b) => {
        const x = key(a), y = key(b);
        const order = x === null ? 1 : y === null ? -1 :
          typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
        return table.desc ? -order : order;
      });
    }
    body.replaceChildren(...rows.map((row) => {
      const tr = document.createElement("tr");
      for (const v of row) tr.appendChild(Object.assign(document.createElement("td"), { textContent: v === null ? "" : String(v) }));
      return tr;
    }));
    [...$("matched").tHead.rows[0].cells].forEach((th, i) =>
      th.setAttribute("aria-sort", i !== table.col ? "none" : table.desc ? "descending" : "ascending"));
  }

  fill("site", unique(C.site));
  fill("arch", ARCHS, null, true);
  fill("n", unique(C.n).sort((a, b) => a - b), null, true);
  fill("curve", unique(C.curve).sort(), null, true);
  fill("metric", D.metrics);
  fill("x", Object.keys(D.axes), Object.values(D.axes));
  fill("law", ["drawn", "power", "floor", "none"], ["the preferred law", "pure power law", "law with floor", "none"]);
  const head = $("matched").tHead.rows[0];
  D.table.columns.forEach((name, i) => {
    const th = Object.assign(document.createElement("th"), { textContent: name, title: "sort" });
    th.addEventListener("click", () => {
      table.desc = table.col === i ? !table.desc : false;
      table.col = i;
      sortTable();
      draw();
    });
    head.appendChild(th);
  });
  restore(location.hash.slice(1));
  for (const id of SELECTS.concat(CHECKS)) $(id).addEventListener("change", draw);
  window.addEventListener("hashchange", () => { restore(location.hash.slice(1)); sortTable(); draw(); });
  sortTable();
  draw();
})();
