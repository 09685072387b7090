// The release console: reads console/status, console/series, console/where and
// /rollouts on the admin address, re-renders every few seconds without reloading, and
// drives rollouts (pause, resume, promote, abort, retry) through the admin API.
// Every JSON call carries the admin token when one was given (kept in sessionStorage).
(() => {
  "use strict";

  const REFRESH_MS = 3000;
  const TOKEN_KEY = "grayroute.console.token";
  const OPEN_KEY = "grayroute.console.open";
  const OPEN_BY_DEFAULT = 5; // with more routes than this, cards start collapsed
  const FINISHED = new Set(["Succeeded", "Failed", "Aborted"]);
  const COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#4b5563"];
  const ACTIONS = {
    pause: (ph) => ph === "Progressing" || ph === "Holding",
    resume: (ph) => ph === "Paused",
    promote: (ph) => !FINISHED.has(ph),
    abort: (ph) => !FINISHED.has(ph),
    retry: (ph) => ph === "Failed" || ph === "Aborted",
  };
  const CONFIRM = {
    promote: (r) => `Promote ${r.canary} on route ${r.route}? It takes 100% of the split at once.`,
    abort: (r) => `Abort the rollout of ${r.canary} on route ${r.route}? Its weight goes to 0 at once.`,
  };

  const $ = (id) => document.getElementById(id);
  const state = {
    status: null,
    rollouts: new Map(), // route -> ROLLOUT
    rolloutsAvailable: true,
    open: loadOpen(), // route -> true/false, as the person left it
    cards: new Map(), // route -> card elements
    charts: new Map(), // route -> {key, share, errors}
    renders: 0,
    timer: 0,
    busy: false,
  };

  class AuthError extends Error {}

  // -- talking to the admin address --------------------------------------------------------
  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  async function api(path, options = {}) {
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    const resp = await fetch(path, { ...options, headers, cache: "no-store" });
    if (resp.status === 401) {
      $("auth-banner").hidden = false;
      throw new AuthError("the admin token is required");
    }
    $("auth-banner").hidden = true;
    return resp;
  }

  async function json(path) {
    const resp = await api(path);
    if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
    return resp.json();
  }

  // -- the refresh loop ---------------------------------------------------------------------
  async function refresh() {
    if (state.busy) return;
    state.busy = true;
    try {
      const [status, rollouts] = await Promise.all([json("console/status"), loadRollouts()]);
      state.status = status;
      state.rollouts = rollouts;
      render();
      await renderCharts();
      state.renders += 1;
      document.body.dataset.renders = String(state.renders);
      $("error-banner").hidden = true;
      $("updated").textContent = "updated " + clock(Date.now() / 1000);
    } catch (err) {
      if (!(err instanceof AuthError)) showError("Cannot reach the router: " + err.message + "; retrying.");
      $("updated").textContent = "";
    } finally {
      state.busy = false;
      clearTimeout(state.timer);
      state.timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  async function loadRollouts() {
    const out = new Map();
    if (!state.rolloutsAvailable) return out;
    const resp = await api("rollouts");
    if (resp.status === 404) {
      state.rolloutsAvailable = false; // a router without progressive rollouts
      return out;
    }
    if (resp.status === 503) return out; // not running yet: next time
    if (!resp.ok) throw new Error(`rollouts: HTTP ${resp.status}`);
    const data = await resp.json();
    for (const r of data.rollouts || []) out.set(r.route, r);
    return out;
  }

  function showError(text) {
    const el = $("error-banner");
    el.textContent = text;
    el.hidden = false;
  }

  // -- rendering ------------------------------------------------------------------------
  function render() {
    const s = state.status;
    renderRules(s.rules, s.unrouted);
    renderRoutes(s.routes);
    renderUpstreams(s.upstreams);
    const minutes = s.window.seconds / 60;
    $("window-text").textContent = minutes >= 1 ? `${fmt(minutes)} minutes` : `${s.window.seconds} seconds`;
  }

  function renderRules(rules, unrouted) {
    const age = rules.age_seconds == null ? "" : ` · loaded ${duration(rules.age_seconds)} ago`;
    $("rules-line").textContent = `rules ${short(rules.digest)}${age}`;
    const last = rules.last_reload;
    let reload = "none since start";
    if (last) {
      const ok = last.result === "success";
      reload = `<span class="badge ${ok ? "ok" : "bad"}">${esc(last.result)}</span> ${esc(last.trigger)} at ${esc(localTime(last.at))}`;
      if (!ok && last.problems && last.problems.length) {
        reload += `<ul class="problems">${last.problems.map((p) => `<li><code>${esc(p)}</code></li>`).join("")}</ul>`;
      }
    }
    const warnings = rules.warnings.map((w) => `<code>${esc(w)}</code>`); // shadowed routes among them
    $("rules").innerHTML = `
      <h2>Rules in force</h2>
      <dl class="facts">
        <dt>digest</dt><dd><code title="${esc(rules.digest)}" data-field="digest">${esc(short(rules.digest))}</code></dd>
        <dt>file</dt><dd><code>${esc(rules.source || "")}</code></dd>
        <dt>loaded</dt><dd>${esc(localTime(rules.loaded_at))}${rules.age_seconds == null ? "" : ` (${duration(rules.age_seconds)} ago)`}</dd>
        <dt>last reload</dt><dd data-field="last-reload">${reload}</dd>
        <dt>workers</dt><dd>${rules.workers.ready} of ${rules.workers.running} ready</dd>
        <dt>no route</dt><dd>${fmtRate(unrouted.rps)} req/s matched no route</dd>
      </dl>
      ${warnings.length ? `<details class="warnings" open><summary>${warnings.length} warning${warnings.length === 1 ? "" : "s"}</summary><ul>${warnings.map((w) => `<li>${w}</li>`).join("")}</ul></details>` : `<p class="muted">No warnings.</p>`}`;
  }

  function renderRoutes(routes) {
    const list = $("route-list");
    const filter = $("filter").value.trim().toLowerCase();
    const seen = new Set();
    let shown = 0;
    for (const route of routes) {
      seen.add(route.name);
      const rollout = state.rollouts.get(route.name);
      let card = state.cards.get(route.name);
      if (!card) {
        card = makeCard(route.name);
        state.cards.set(route.name, card);
      }
      list.appendChild(card.root); // keeps file order; moves a card only when it changed place
      const visible = !filter || matches(route, rollout, filter);
      card.root.hidden = !visible;
      shown += visible ? 1 : 0;
      if (!card.placed) {
        // Decided once per card: a card never opens or closes under a person's eyes.
        const preferred = state.open[route.name];
        card.root.open = preferred != null ? preferred : routes.length <= OPEN_BY_DEFAULT || (rollout != null && !FINISHED.has(rollout.phase));
        card.placed = true;
      }
      fillCard(card, route, rollout);
    }
    for (const [name, card] of state.cards) {
      if (!seen.has(name)) {
        card.root.remove();
        state.cards.delete(name);
        dropCharts(name);
      }
    }
    $("route-count").textContent = filter ? `${shown} of ${routes.length}` : `${routes.length}`;
  }

  function matches(route, rollout, filter) {
    const words = [route.name, ...route.versions.map((v) => v.upstream)];
    if (rollout) words.push(rollout.phase);
    return words.some((w) => String(w).toLowerCase().includes(filter));
  }

  function makeCard(name) {
    const root = document.createElement("details");
    root.className = "route";
    root.dataset.route = name;
    root.innerHTML = `
      <summary><span class="name"></span><span class="badges"></span><span class="brief"></span></summary>
      <div class="body">
        <div class="scroll versions"></div>
        <div class="rollout"></div>
        <div class="charts">
          <figure><figcaption>Share of requests (%)</figcaption><div class="chart share"></div></figure>
          <figure><figcaption>Error rate (% 5xx)</figcaption><div class="chart errors"></div></figure>
        </div>
        <ul class="marks"></ul>
        <div class="pins"></div>
      </div>`;
    root.querySelector(".name").textContent = name;
    // Only a person's click is remembered (the default opening is not a choice).
    root.querySelector("summary").addEventListener("click", () => {
      state.open[name] = !root.open;
      sessionStorage.setItem(OPEN_KEY, JSON.stringify(state.open));
    });
    root.addEventListener("toggle", () => root.open && renderCharts().catch(() => {}));
    root.querySelector(".rollout").addEventListener("click", onAction);
    return {
      root,
      badges: root.querySelector(".badges"),
      brief: root.querySelector(".brief"),
      versions: root.querySelector(".versions"),
      rollout: root.querySelector(".rollout"),
      share: root.querySelector(".chart.share"),
      errors: root.querySelector(".chart.errors"),
      marks: root.querySelector(".marks"),
      pins: root.querySelector(".pins"),
    };
  }

  function fillCard(card, route, rollout) {
    const roles = {};
    for (const v of route.versions) if (v.role) roles[v.upstream] = v.role;
    if (rollout) {
      roles[rollout.canary] = "canary";
      roles[rollout.stable] = "stable";
    }
    let badges = `<span class="badge">${esc(route.decides)}</span>`;
    if (route.shadowed_by) badges += ` <span class="badge bad" title="route ${esc(route.shadowed_by)}, above it, matches every request it would">never used: ${esc(route.shadowed_by)} takes its requests</span>`;
    if (rollout) badges += ` <span class="badge phase ${esc(rollout.phase)}" data-field="phase">${esc(rollout.phase)}</span>`;
    setHTML(card.badges, badges);
    const shares = route.versions
      .filter((v) => v.upstream && (v.effective != null || v.observed != null))
      .map((v) => `${esc(v.upstream)} ${fmtPct(v.effective != null ? v.effective : v.observed)}`)
      .join(" · ");
    setHTML(card.brief, `${shares}<span class="muted"> · ${fmtRate(route.rps)} req/s · ${fmtPct(route.error_rate)} errors</span>`);

    const rows = route.versions
      .map((v) => `
        <tr data-version="${esc(v.upstream)}">
          <th scope="row">${v.upstream ? esc(v.upstream) : '<span class="muted">(answered by the route)</span>'}${roles[v.upstream] ? ` <span class="badge role">${roles[v.upstream]}</span>` : ""}</th>
          <td data-field="configured">${fmtPct(v.configured)}</td>
          <td data-field="effective">${fmtPct(v.effective)}</td>
          <td data-field="observed">${fmtPct(v.observed)}</td>
          <td data-field="rps">${fmtRate(v.rps)}</td>
          <td data-field="error_rate">${fmtPct(v.error_rate)}</td>
          <td data-field="p50">${fmtMs(v.p50_ms)}</td>
          <td data-field="p99">${fmtMs(v.p99_ms)}</td>
          <td data-field="requests">${fmtInt(v.requests)}</td>
          <td data-field="latency_samples">${fmtInt(v.latency_samples)}</td>
        </tr>`)
      .join("");
    setHTML(card.versions, `
      <table class="numbers">
        <thead><tr><th>version</th><th title="share of the split in the rule file">configured</th>
        <th title="share of the split in force now (rollout, replicas)">effective</th>
        <th title="share of this route's requests in the window (pins included)">observed</th>
        <th>req/s</th><th title="answers 5xx">errors</th><th>p50</th><th>p99</th>
        <th title="requests in the window">requests</th><th title="requests the latency rests on (the upstream, every route)">latency n</th></tr></thead>
        <tbody>${rows}</tbody>
      </table>`);
    setHTML(card.rollout, rollout ? rolloutHTML(rollout, route) : "");
    setHTML(card.pins, pinsHTML(route));
  }

  function rolloutHTML(r, route) {
    const steps = r.steps;
    const shown = steps == null ? [] : steps.length <= 8 ? steps.map((s) => s + "%") : [steps[0] + "%", "…", steps[steps.length - 1] + "%"];
    const where = steps == null || r.step == null ? "guard mode (weights follow replicas)" : `step ${r.step + 1}/${steps.length} (${shown.join(" → ")})`;
    const buttons = Object.keys(ACTIONS)
      .map((a) => `<button type="button" data-action="${a}" ${ACTIONS[a](r.phase) ? "" : "disabled"}>${a[0].toUpperCase() + a.slice(1)}</button>`)
      .join(" ");
    const verdicts = (r.analysis || []).slice(0, 5).map(verdictHTML).join("");
    return `
      <div class="rollout-head" data-phase="${esc(r.phase)}">
        <b>Rollout</b> <span class="badge phase ${esc(r.phase)}">${esc(r.phase)}</span>
        <span data-field="step">${esc(where)}</span> ·
        canary <b>${esc(r.canary)}</b> at <span data-field="weight">${fmtPct(r.weight)}</span> against <b>${esc(r.stable)}</b> ·
        failures ${fmtInt(r.failures)}${r.max_failures != null ? ` of ${fmtInt(r.max_failures)}` : ""} in this step ·
        since ${esc(localTime(r.since))}
      </div>
      ${r.reason ? `<p class="muted">${esc(r.reason)}</p>` : ""}
      ${cohortsHTML(r, route)}
      <div class="actions">${buttons}<span class="action-result" role="status"></span></div>
      ${verdicts ? `<div class="scroll"><table class="verdicts"><thead><tr><th>interval</th><th>verdict</th><th class="gate">gate</th><th>canary</th><th>stable</th><th>threshold</th><th>n canary / stable</th><th>gate verdict</th></tr></thead><tbody>${verdicts}</tbody></table></div>` : `<p class="muted">No interval judged yet.</p>`}`;
  }

  // The split traffic the rollout judges, stable beside canary, over the window.
  function cohortsHTML(r, route) {
    const rows = [r.stable, r.canary]
      .map((name) => {
        const v = route.versions.find((x) => x.upstream === name);
        const s = v && v.split;
        if (!s) return "";
        const role = name === r.canary ? "canary" : "stable";
        return `<tr data-cohort="${role}"><th scope="row">${esc(name)} <span class="badge role">${role}</span></th>
          <td data-field="requests">${fmtInt(s.requests)}</td><td>${fmtRate(s.rps)}</td>
          <td data-field="error_rate">${fmtPct(s.error_rate)}</td><td>${fmtInt(s.errors)}</td>
          <td data-field="p50">${fmtMs(s.p50_ms)}</td><td data-field="p99">${fmtMs(s.p99_ms)}</td></tr>`;
      })
      .join("");
    if (!rows) return "";
    return `<div class="scroll"><table class="numbers cohorts"><caption>Split traffic the rollout judges (no pins), over the window</caption>
      <thead><tr><th>version</th><th>requests</th><th>req/s</th><th title="5xx, or taken by a fallback">failure rate</th><th>failed</th><th>p50</th><th>p99</th></tr></thead>
      <tbody>${rows}</tbody></table></div>`;
  }

  function verdictHTML(interval) {
    const gates = Object.entries(interval.gates || {});
    const head = `<td>${esc(localTime(interval.at))}</td><td><span class="badge verdict ${esc(interval.verdict)}">${esc(interval.verdict)}</span></td>`;
    if (!gates.length) return `<tr>${head}<td colspan="6" class="muted">${esc(interval.reason || "")}</td></tr>`;
    return gates
      .map(([name, g], i) => {
        const show = name === "latency" ? (x) => fmtMs(x == null ? null : x * 1000) : (x) => fmtPct(x == null ? null : x * 100);
        return `<tr>${i === 0 ? head.replace(/<td>/g, `<td rowspan="${gates.length}">`) : ""}
          <td class="gate">${esc(name)}</td><td>${show(g.canary)}</td><td>${show(g.stable)}</td><td>${show(g.threshold)}</td>
          <td>${fmtInt(g.canary_requests)} / ${fmtInt(g.stable_requests)}</td>
          <td><span class="badge verdict ${esc(g.verdict)}">${esc(g.verdict)}</span></td></tr>`;
      })
      .join("");
  }

  function pinsHTML(route) {
    if (!route.pins.length) return `<p class="muted">No pins.</p>`;
    const kinds = Object.entries(route.pins_by_kind).map(([k, n]) => `${esc(k)} ${fmtInt(n)}`).join(", ");
    const items = route.pins
      .map((p) => `<li data-pin="${p.index}">pin[${p.index}] → <b>${esc(p.to)}</b> when ${p.kinds.map((k) => `<span class="kind">${esc(k.kind)}</span> ${esc(k.text)}`).join(" and ")}</li>`)
      .join("");
    return `<h3>Pins <span class="muted">(${kinds})</span></h3><ul class="pin-list">${items}</ul>`;
  }

  function renderUpstreams(upstreams) {
    const rows = Object.entries(upstreams)
      .map(([name, u]) => {
        const eps = Object.entries(u.health || {})
          .map(([ep, h]) => {
            const since = h.since ? ` since ${esc(localTime(h.since))}` : "";
            const by = h.state === "down" && h.by ? ` (${esc(h.by)} check${h.workers > 1 ? `, ${h.workers_down} of ${h.workers} workers` : ""})` : "";
            return `<li class="ep ${esc(h.state)}" data-endpoint="${esc(ep)}"><span class="dot"></span><code>${esc(ep)}</code> <span data-field="state">${esc(h.state)}</span>${since}${by}</li>`;
          })
          .join("");
        const dns = u.dns ? `<div class="muted">DNS ${esc(u.dns.name || "")}</div>` : "";
        const fb = u.fallback
          ? `→ <b>${esc(u.fallback)}</b>: ${fmtInt(u.fallback_use.window)} in the window, ${fmtInt(u.fallback_use.total)} in all`
          : `<span class="muted">none</span>`;
        const errs = Object.entries(u.upstream_errors || {}).map(([k, n]) => `${esc(k)} ${fmtInt(n)}`).join(", ");
        return `<tr data-upstream="${esc(name)}">
          <th scope="row">${esc(name)}${dns}</th>
          <td><ul class="eps">${eps || '<li class="muted">no endpoints</li>'}</ul></td>
          <td>${fmtInt(u.healthy_endpoints)} / ${fmtInt(Object.keys(u.health || {}).length)}</td>
          <td>${fmtRate(u.rps)}</td><td>${fmtPct(u.error_rate)}</td><td>${fmtMs(u.p50_ms)}</td><td>${fmtMs(u.p99_ms)}</td>
          <td>${errs || '<span class="muted">none</span>'}</td>
          <td>${fb}</td></tr>`;
      })
      .join("");
    setHTML($("upstream-list"), `
      <table class="numbers upstreams"><thead><tr><th>upstream</th><th>endpoints</th><th>up</th><th>req/s</th><th>errors</th><th>p50</th><th>p99</th><th>upstream errors</th><th>fallback</th></tr></thead>
      <tbody>${rows}</tbody></table>`);
  }

  // -- charts ---------------------------------------------------------------------------------
  async function renderCharts() {
    const open = [...state.cards.entries()].filter(([, c]) => c.root.open && !c.root.hidden);
    await Promise.all(
      open.map(async ([name, card]) => {
        let series;
        try {
          series = await json("console/series?route=" + encodeURIComponent(name));
        } catch (err) {
          if (err instanceof AuthError) throw err;
          return;
        }
        drawCharts(name, card, series);
      }),
    );
  }

  function drawCharts(name, card, s) {
    const names = Object.keys(s.versions);
    const key = names.join("\u0000");
    let charts = state.charts.get(name);
    if (charts && charts.key !== key) {
      dropCharts(name);
      charts = null;
    }
    const width = Math.max(card.share.clientWidth, 240);
    if (!charts) {
      charts = {
        key,
        marks: [],
        share: makeChart(card.share, names, width, 100, () => charts.marks),
        errors: makeChart(card.errors, names, width, null, () => charts.marks),
      };
      state.charts.set(name, charts);
    }
    charts.marks = s.marks;
    charts.share.setData([s.t, ...names.map((n) => s.versions[n].share)]);
    charts.errors.setData([s.t, ...names.map((n) => s.versions[n].error_rate)]);
    setHTML(card.marks, s.marks
      .slice(-8)
      .reverse()
      .map((m) => `<li class="mark ${esc(m.kind)}">${esc(clock(m.at))} ${esc(m.text)}</li>`)
      .join(""));
  }

  function makeChart(el, names, width, max, marks) {
    const opts = {
      width,
      height: 160,
      legend: { show: true, live: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: max == null ? { range: (u, lo, hi) => [0, Math.max(1, hi)] } : { range: [0, max] } },
      axes: [{}, { values: (u, vals) => vals.map((v) => v + "%"), size: 48 }],
      series: [{}, ...names.map((n, i) => ({ label: n || "(route)", stroke: COLORS[i % COLORS.length], width: 2, spanGaps: false, points: { show: false } }))],
      plugins: [marksPlugin(marks)],
    };
    el.textContent = "";
    return new uPlot(opts, [[], ...names.map(() => [])], el);
  }

  // Vertical lines where the rules reloaded (grey) or the route's weights changed (violet).
  function marksPlugin(marks) {
    return {
      hooks: {
        draw: (u) => {
          const ctx = u.ctx;
          const { top, height } = u.bbox;
          ctx.save();
          ctx.lineWidth = 2 * devicePixelRatio;
          ctx.setLineDash([4 * devicePixelRatio, 3 * devicePixelRatio]);
          for (const m of marks()) {
            const x = u.valToPos(m.at, "x", true);
            if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
            ctx.strokeStyle = m.kind === "reload" ? "#6b7280" : "#7c3aed";
            ctx.beginPath();
            ctx.moveTo(x, top);
            ctx.lineTo(x, top + height);
            ctx.stroke();
          }
          ctx.restore();
        },
      },
    };
  }

  function dropCharts(name) {
    const charts = state.charts.get(name);
    if (!charts) return;
    charts.share.destroy();
    charts.errors.destroy();
    state.charts.delete(name);
  }

  function resizeCharts() {
    for (const [name, charts] of state.charts) {
      const card = state.cards.get(name);
      if (!card) continue;
      const width = Math.max(card.share.clientWidth, 240);
      charts.share.setSize({ width, height: 160 });
      charts.errors.setSize({ width, height: 160 });
    }
  }

  // -- acting on a rollout --------------------------------------------------------------------
  async function onAction(event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const card = button.closest("details.route");
    const route = card.dataset.route;
    const action = button.dataset.action;
    const rollout = state.rollouts.get(route);
    const result = card.querySelector(".action-result");
    if (CONFIRM[action] && !window.confirm(CONFIRM[action](rollout || { route, canary: "the canary" }))) return;
    button.disabled = true;
    try {
      const resp = await api(`rollouts/${encodeURIComponent(route)}/${action}`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ by: "release console" }), // who acted, for the audit log
      });
      const body = await resp.json().catch(() => ({}));
      result.textContent = resp.ok ? `${action}: done` : `${action} refused: ${body.detail || body.error || "HTTP " + resp.status}`;
      result.className = "action-result " + (resp.ok ? "ok" : "bad");
    } catch (err) {
      result.textContent = `${action} failed: ${err.message}`;
      result.className = "action-result bad";
    }
    refresh();
  }

  // -- the search -------------------------------------------------------------------------------
  async function onWhere(event) {
    event.preventDefault();
    const params = new URLSearchParams({ user: $("where-user").value.trim() });
    for (const f of ["path", "host"]) {
      const v = $("where-" + f).value.trim();
      if (v) params.set(f, v);
    }
    const out = $("where-result");
    out.textContent = "…";
    try {
      const resp = await api("console/where?" + params);
      const data = await resp.json();
      if (!resp.ok) {
        out.innerHTML = `<p class="bad">${esc(data.detail || data.error)}</p>`;
        return;
      }
      out.innerHTML = whereHTML(data);
    } catch (err) {
      out.innerHTML = `<p class="bad">${esc(err.message)}</p>`;
    }
  }

  function whereHTML(data) {
    const rows = data.answers
      .map((a) => {
        if (a.error) return `<tr data-route="${esc(a.route)}"><th scope="row">${esc(a.route)}</th><td colspan="3" class="muted">${esc(a.error)}</td></tr>`;
        const ans = a.answer;
        const line = JSON.stringify(a.request);
        const src = ans.user_id_source ? `${esc(ans.user_id)} from ${esc(ans.user_id_source)}` : '<span class="muted">no user ID</span>';
        const sources = ans.user_id_sources
          ? `<div class="muted">${Object.entries(ans.user_id_sources).map(([k, v]) => `${esc(k)}: ${esc(v)}`).join("; ")}</div>`
          : "";
        return `<tr data-route="${esc(a.route || "")}">
          <th scope="row">${a.route ? esc(a.route) : '<span class="muted">(no route)</span>'}</th>
          <td data-field="upstream"><b>${esc(ans.upstream || (ans.status ? "answers " + ans.status : "–"))}</b></td>
          <td data-field="reason">${esc(ans.reason || ans.error || "")}${sources}</td>
          <td>${src}<details class="line"><summary>explain line</summary><code>echo '${esc(line)}' | grayroute explain --why RULES</code></details></td></tr>`;
      })
      .join("");
    return `<p class="muted">User <b>${esc(data.user)}</b>, rules in force ${esc(short(data.rules))} (weights as routed now):</p>
      <div class="scroll"><table class="numbers where"><thead><tr><th>route</th><th>goes to</th><th>why</th><th>user ID</th></tr></thead><tbody>${rows}</tbody></table></div>`;
  }

  // -- small helpers ------------------------------------------------------------------------------
  function setHTML(el, html) {
    if (el._html !== html) {
      el.innerHTML = html;
      el._html = html;
    }
  }

  function esc(v) {
    return String(v == null ? "" : v).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }

  function fmt(x) {
    return Number.isInteger(x) ? String(x) : x.toFixed(1);
  }
  function fmtPct(x) {
    return x == null ? "–" : (x < 10 && x !== 0 ? x.toFixed(2) : x.toFixed(1)) + "%";
  }
  function fmtRate(x) {
    return x == null ? "–" : x < 10 ? x.toFixed(2) : x.toFixed(1);
  }
  function fmtMs(x) {
    return x == null ? "–" : (x < 10 ? x.toFixed(2) : x < 100 ? x.toFixed(1) : x.toFixed(0)) + " ms";
  }
  function fmtInt(x) {
    return x == null ? "–" : Number(x).toLocaleString("en-US");
  }
  function short(digest) {
    return digest ? String(digest).slice(0, 12) : "–";
  }
  function clock(unix) {
    return new Date(unix * 1000).toLocaleTimeString([], { hour12: false });
  }
  function localTime(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toLocaleTimeString([], { hour12: false });
  }
  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }
  function loadOpen() {
    try {
      return JSON.parse(sessionStorage.getItem(OPEN_KEY) || "{}") || {};
    } catch {
      return {};
    }
  }

  // -- wiring ------------------------------------------------------------------------------------
  $("token").value = token();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const t = $("token").value.trim();
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    else sessionStorage.removeItem(TOKEN_KEY);
    state.rolloutsAvailable = true;
    refresh();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    refresh();
  });
  $("filter").addEventListener("input", () => state.status && (renderRoutes(state.status.routes), renderCharts()));
  $("expand-all").addEventListener("click", () => setAll(true));
  $("collapse-all").addEventListener("click", () => setAll(false));
  $("where-form").addEventListener("submit", onWhere);
  window.addEventListener("resize", resizeCharts);
  document.addEventListener("visibilitychange", () => document.visibilityState === "visible" && refresh());

  function setAll(open) {
    for (const [name, card] of state.cards) {
      if (card.root.hidden) continue;
      card.root.open = open;
      state.open[name] = open;
    }
    sessionStorage.setItem(OPEN_KEY, JSON.stringify(state.open));
  }

  refresh();
})();
