/* virtfleet's page: the VM list, a create form, the serial console and the hosts, kept live
 * by the event stream. Talks only to /api/v1 with the user's token (Authorization: Bearer,
 * never in a URL), and, for the interactive console, to the VM host's websocket with a
 * single-use console token from the API. Everything from the API goes into the page through
 * textContent. */
(() => {
  "use strict";

  const API = "/api/v1";
  const TOKEN_KEY = "virtfleet.token";
  const STATES = ["pending", "building", "running", "ready", "stopping", "stopped", "rebooting",
    "resizing", "snapshotting", "deleting", "error", "unknown"];
  const BACKOFF_MIN_MS = 1000;
  const BACKOFF_MAX_MS = 30000;
  const STREAM_SILENCE_MS = 45000;  // the server sends a keep-alive every 15 s
  const HOSTS_POLL_MS = 15000;      // heartbeats are not events: poll the hosts gently

  const $ = (id) => document.getElementById(id);

  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  const vms = new Map();            // vm id -> last VM object seen
  const rows = new Map();           // vm id -> <tr>
  const images = new Map();         // image id -> image
  const vmFetches = new Map();      // vm id -> {again: bool} while a re-fetch is in flight
  const touched = new Map();        // vm id -> when a single-VM answer last updated its row
  const gone = new Set();           // ids seen deleted: a late, older answer must not revive them
  let consoleVm = null;             // id of the VM whose console is shown
  let liveConsole = null;           // {ws, vmId, decoder, pendingCr} while typing into a console
  const LIVE_CONSOLE_MAX_CHARS = 200000;
  let hostsTimer = null;
  let hostsSoon = null;
  let stream = null;                // {ctrl, retryTimer, backoff, watchdog}
  let session = 0;                  // bumps on sign-in/out so stale async work is dropped

  /* ---------- helpers ---------- */

  function el(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === undefined || value === null) continue;
        if (key === "text") node.textContent = String(value);
        else if (key === "class") node.className = value;
        else if (key === "dataset") Object.assign(node.dataset, value);
        else if (key === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
        else node.setAttribute(key, String(value));
      }
    }
    for (const child of children || []) if (child) node.appendChild(child);
    return node;
  }

  function show(node, visible) { node.hidden = !visible; }

  function parseTime(value) {
    if (!value) return null;
    // The API writes UTC; a timestamp without an offset is UTC, not local time.
    const text = /([zZ]|[+-]\d\d:?\d\d)$/.test(value) ? value : value + "Z";
    const date = new Date(text);
    return Number.isNaN(date.getTime()) ? null : date;
  }

  function formatTime(value) {
    const d = parseTime(value);
    if (!d) return value || "—";
    const p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
      `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  /** A serial log as text: terminal escape sequences and stray control characters removed. */
  function cleanConsole(text) {
    return text
      .replace(/\r\n?/g, "\n")
      .replace(/\x1b\[[0-9;?]*[ -\/]*[@-~]/g, "")
      .replace(/\x1b[@-Z\\-_]/g, "")
      .replace(/[\x00-\x08\x0b-\x1f\x7f]/g, "");
  }

  function formatMiB(mb) {
    if (mb === undefined || mb === null) return "—";
    if (mb >= 4096) return `${(mb / 1024).toFixed(mb % 1024 === 0 ? 0 : 1)} GiB`;
    return `${mb} MiB`;
  }

  /* ---------- the API ---------- */

  class ApiError extends Error {
    constructor(status, body, fallback) {
      const message = (body && (body.message || body.status)) || fallback || `HTTP ${status}`;
      super(message);
      this.status = status;
      this.body = body || {};
    }

    /** Field errors as "field: message" lines, whatever their nesting. */
    fieldErrors() {
      const out = [];
      const walk = (value, path) => {
        if (Array.isArray(value)) {
          const flat = value.filter((v) => typeof v !== "object" || v === null);
          if (flat.length) out.push(`${path.join(".") || "request"}: ${flat.join(" ")}`);
          value.filter((v) => v && typeof v === "object").forEach((v) => walk(v, path));
        } else if (value && typeof value === "object") {
          for (const [key, sub] of Object.entries(value)) {
            // flask-smorest groups by location ({"json": {...}}): the field name is enough.
            const skip = path.length === 0 && ["json", "query", "form", "headers"].includes(key);
            walk(sub, skip ? path : path.concat(key));
          }
        } else if (value !== undefined && value !== null && value !== "") {
          out.push(`${path.join(".") || "request"}: ${value}`);
        }
      };
      walk(this.body.errors, []);
      return out;
    }
  }

  async function api(method, path, body, opts) {
    const headers = { Accept: "application/json", Authorization: `Bearer ${token}` };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(API + path, init);
    } catch (err) {
      throw new ApiError(0, null, "the server cannot be reached");
    }
    const text = await response.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (err) { data = null; }
    }
    if (!response.ok) {
      const error = new ApiError(response.status, data, response.statusText);
      if (response.status === 401 && !(opts && opts.signingIn)) signOut(error.message);
      throw error;
    }
    return data;
  }

  /* ---------- banner ---------- */

  function banner(message) {
    $("banner").textContent = message || "";
    show($("banner"), Boolean(message));
  }

  /* ---------- VMs ---------- */

  function imageLabel(imageId) {
    const image = images.get(imageId);
    return image ? image.name : (imageId || "—").slice(0, 8);
  }

  /** "building 2.1 s → running": how long each state took (a single VM's view has steps). */
  function stepsTitle(steps) {
    if (!Array.isArray(steps) || !steps.length) return null;
    return steps.map((step) => (typeof step.seconds === "number"
      ? `${step.state} ${step.seconds.toFixed(1)} s` : step.state)).join(" → ");
  }

  /** One line under the state: how long the build took up to ready (its steps as a tooltip),
   * the step it is in, or the host's measure of the first boot (the list has no steps). */
  function timingsLine(vm) {
    const timings = Array.isArray(vm.timings) ? vm.timings : [];
    const secs = (t) => (typeof t.seconds === "number" ? `${t.seconds.toFixed(1)} s` : "…");
    const title = timings.map((t) => `${t.step} ${secs(t)}${t.failed ? " (failed)" : ""}`)
      .join(" · ") || null;
    let text = "";
    if (vm.state === "ready" && timings.length) {
      const total = timings.reduce((sum, t) => sum + (t.seconds || 0), 0);
      text = `ready in ${total.toFixed(1)} s`;
    } else if (vm.state === "ready" && typeof vm.boot_seconds === "number") {
      text = `booted in ${vm.boot_seconds.toFixed(1)} s`;
    } else if (timings.length && timings[timings.length - 1].seconds === null
               && ["building", "running"].includes(vm.state)) {
      text = `${timings[timings.length - 1].step}…`;
    }
    return text ? el("span", { class: "sub timings", text, title }) : null;
  }

  function stateBadge(state, steps) {
    const known = STATES.includes(state) ? state : "unknown";
    return el("span", {
      class: "badge", text: state || "unknown", dataset: { state: known }, title: stepsTitle(steps),
    });
  }

  function buildRowCells(vm) {
    const stateCell = el("td", { class: "state" }, [stateBadge(vm.state, vm.steps)]);
    const timings = timingsLine(vm);
    if (timings) stateCell.appendChild(timings);
    // Why it failed, why its host lost it, or (running) why it is not `ready`.
    if (["error", "unknown", "running"].includes(vm.state) && (vm.state_reason || vm.failed_step)) {
      const reason = vm.failed_step
        ? `${vm.failed_step}: ${vm.state_reason || "failed"}` : vm.state_reason;
      stateCell.appendChild(el("span", { class: "reason", text: reason }));
    }
    const consoleButton = el("button", {
      class: "btn btn-small", type: "button", text: "Console", dataset: { action: "console" },
      on: { click: () => openConsole(vm.id) },
    });
    const deleteButton = el("button", {
      class: "btn btn-small btn-danger", type: "button", text: "Delete",
      dataset: { action: "delete" }, on: { click: () => deleteVm(vm.id) },
    });
    if (vm.state === "deleting") deleteButton.disabled = true;
    return [
      el("td", {}, [
        el("span", { class: "name", text: vm.name }),
        el("span", { class: "sub mono", text: (vm.id || "").slice(0, 8), title: vm.id }),
      ]),
      stateCell,
      el("td", { class: "host", text: vm.host || "—" }),
      el("td", { class: "num", text: vm.vcpus }),
      el("td", { class: "num", text: formatMiB(vm.memory_mb) }),
      el("td", { class: "num", text: `${vm.disk_gb} GiB` }),
      el("td", { class: "image", text: imageLabel(vm.image_id), title: vm.image_id }),
      el("td", { class: "created", text: formatTime(vm.created_at), title: vm.created_at }),
      el("td", { class: "actions" }, [consoleButton, deleteButton]),
    ];
  }

  function upsertVm(vm, position) {
    if (gone.has(vm.id)) return;
    vms.set(vm.id, vm);
    let row = rows.get(vm.id);
    if (!row) {
      row = el("tr", { dataset: { vmId: vm.id } });
      rows.set(vm.id, row);
    }
    row.dataset.vmName = vm.name;
    row.dataset.state = vm.state;
    row.replaceChildren(...buildRowCells(vm));
    row.classList.toggle("selected", consoleVm === vm.id);
    const body = $("vm-rows");
    if (position === "append" || !row.parentNode) body.appendChild(row);
    updateVmCount();
  }

  function removeVm(vmId) {
    gone.add(vmId);
    touched.delete(vmId);
    vms.delete(vmId);
    const row = rows.get(vmId);
    if (row) row.remove();
    rows.delete(vmId);
    if (consoleVm === vmId) $("console-status").textContent = "(the VM was deleted)";
    updateVmCount();
  }

  function updateVmCount() {
    const n = rows.size;
    $("vm-count").textContent = n ? `${n} VM${n === 1 ? "" : "s"}` : "";
    show($("vms-empty"), n === 0);
    show($("vms").tHead, n > 0);
  }

  async function loadVms() {
    const mine = session;
    const started = performance.now();
    const list = await api("GET", "/vms");
    if (mine !== session) return;
    // A row a single-VM answer updated after this list was asked for is fresher: keep it.
    const fresher = (id) => (touched.get(id) || 0) > started;
    const seen = new Set(list.map((vm) => vm.id));
    for (const id of Array.from(rows.keys())) if (!seen.has(id) && !fresher(id)) removeVm(id);
    for (const vm of list) {
      const row = rows.get(vm.id);
      if (!fresher(vm.id)) upsertVm(vm, "append");  // appending in API order keeps the order
      else if (row) $("vm-rows").appendChild(row);
    }
    banner("");
  }

  /** Re-read one VM; several events for it in a row cost at most one extra fetch. */
  function refreshVm(vmId) {
    const inflight = vmFetches.get(vmId);
    if (inflight) { inflight.again = true; return; }
    const state = { again: false };
    vmFetches.set(vmId, state);
    const mine = session;
    const run = async () => {
      try {
        do {
          state.again = false;
          try {
            const vm = await api("GET", `/vms/${encodeURIComponent(vmId)}`);
            if (mine !== session) return;
            touched.set(vmId, performance.now());
            upsertVm(vm);
          } catch (err) {
            if (mine !== session) return;
            if (err.status === 404) removeVm(vmId);
            else if (err.status !== 401) banner(`Could not refresh a VM: ${err.message}`);
          }
        } while (state.again);
      } finally {
        vmFetches.delete(vmId);
      }
    };
    run();
  }

  async function deleteVm(vmId) {
    const vm = vms.get(vmId);
    const name = vm ? vm.name : vmId;
    if (!window.confirm(`Delete VM "${name}"? Its disks are destroyed.`)) return;
    try {
      await api("DELETE", `/vms/${encodeURIComponent(vmId)}`);
      refreshVm(vmId);
      hostsRefreshSoon();
    } catch (err) {
      if (err.status === 404) removeVm(vmId);
      else if (err.status !== 401) banner(`Could not delete ${name}: ${err.message}`);
    }
  }

  /* ---------- console ---------- */

  function openConsole(vmId) {
    if (consoleVm !== vmId) stopLiveConsole();
    consoleVm = vmId;
    for (const [id, row] of rows) row.classList.toggle("selected", id === vmId);
    const vm = vms.get(vmId);
    $("console-name").textContent = vm ? `— ${vm.name}` : "";
    $("console-output").textContent = "";
    show($("console"), true);
    loadConsole();
    $("console").scrollIntoView({ block: "nearest" });
  }

  function closeConsole() {
    stopLiveConsole();
    consoleVm = null;
    for (const row of rows.values()) row.classList.remove("selected");
    show($("console"), false);
    $("console-output").textContent = "";
  }

  async function loadConsole() {
    const vmId = consoleVm;
    if (!vmId || liveConsole) return;
    const out = $("console-output");
    const status = $("console-status");
    status.textContent = "loading…";
    $("console-refresh").disabled = true;
    try {
      const data = await api("GET", `/vms/${encodeURIComponent(vmId)}/console`);
      if (consoleVm !== vmId) return;
      const atBottom = out.scrollTop + out.clientHeight >= out.scrollHeight - 8;
      out.textContent = cleanConsole(data.output || "");
      if (atBottom || !out.dataset.loaded) out.scrollTop = out.scrollHeight;
      out.dataset.loaded = "1";
      status.textContent = `updated ${formatTime(new Date().toISOString())}`;
    } catch (err) {
      if (consoleVm !== vmId) return;
      status.textContent = "";
      if (err.status !== 401) out.textContent = `(${err.message})`;
    } finally {
      $("console-refresh").disabled = false;
    }
  }

  /* ---------- interactive console (a websocket to the VM's host) ---------- */

  function liveControls(on) {
    $("console-live").textContent = on ? "Disconnect" : "Interactive";
    $("console-refresh").disabled = on;
    show($("console-input-form"), on);
  }

  function appendConsole(live, text) {
    const out = $("console-output");
    // A CR at a chunk's end may be the first half of CRLF: hold it for the next chunk.
    let chunk = (live.pendingCr ? "\r" : "") + text;
    live.pendingCr = chunk.endsWith("\r");
    if (live.pendingCr) chunk = chunk.slice(0, -1);
    const atBottom = out.scrollTop + out.clientHeight >= out.scrollHeight - 8;
    const all = out.textContent + cleanConsole(chunk);
    out.textContent = all.length > LIVE_CONSOLE_MAX_CHARS ? all.slice(-LIVE_CONSOLE_MAX_CHARS) : all;
    if (atBottom) out.scrollTop = out.scrollHeight;
  }

  async function startLiveConsole() {
    const vmId = consoleVm;
    if (!vmId) return;
    stopLiveConsole();
    const status = $("console-status");
    status.textContent = "connecting…";
    $("console-live").disabled = true;
    let grant;
    try {
      grant = await api("POST", `/vms/${encodeURIComponent(vmId)}/console/token`);
    } catch (err) {
      if (consoleVm === vmId && err.status !== 401) status.textContent = `interactive: ${err.message}`;
      return;
    } finally {
      $("console-live").disabled = false;
    }
    if (consoleVm !== vmId || liveConsole) return;
    let ws;
    try {
      ws = new WebSocket(grant.url);
    } catch (err) {
      status.textContent = `interactive: ${err.message}`;
      return;
    }
    ws.binaryType = "arraybuffer";
    const live = { ws, vmId, decoder: new TextDecoder(), pendingCr: false };
    liveConsole = live;
    liveControls(true);
    ws.onopen = () => {
      if (liveConsole !== live) return;
      status.textContent = "interactive";
      $("console-input").focus();
    };
    ws.onmessage = (event) => {
      if (liveConsole !== live) return;
      const text = typeof event.data === "string"
        ? event.data : live.decoder.decode(new Uint8Array(event.data), { stream: true });
      appendConsole(live, text);
    };
    ws.onclose = (event) => {
      if (liveConsole !== live) return;
      liveConsole = null;
      liveControls(false);
      status.textContent = `interactive console closed${event.reason ? `: ${event.reason}` : ""}`;
    };
  }

  function stopLiveConsole() {
    const live = liveConsole;
    if (!live) return;
    liveConsole = null;
    live.ws.close(1000, "closed from the page");
    liveControls(false);
    $("console-status").textContent = "";
  }

  function sendConsole(text) {
    if (liveConsole && liveConsole.ws.readyState === WebSocket.OPEN) liveConsole.ws.send(text);
  }

  function submitConsoleInput(event) {
    event.preventDefault();
    const input = $("console-input");
    sendConsole(`${input.value}\r`);  // Enter on a terminal sends CR
    input.value = "";
  }

  /* ---------- images and the create form ---------- */

  async function loadImages() {
    const mine = session;
    const list = await api("GET", "/images");
    if (mine !== session) return;
    images.clear();
    const select = $("vm-image");
    const previous = select.value;
    select.replaceChildren();
    for (const image of list) {
      images.set(image.id, image);
      const label = image.project && image.visibility === "public"
        ? `${image.name} (public, ${image.project})` : image.name;
      select.appendChild(el("option", { value: image.id, text: label }));
    }
    if (!list.length) select.appendChild(el("option", { value: "", text: "(no images yet)" }));
    if (previous && images.has(previous)) select.value = previous;
    for (const vm of vms.values()) upsertVm(vm);  // image names may now be known
  }

  function integerField(input) {
    const raw = input.value.trim();
    if (raw === "") return undefined;           // the API's default
    return /^-?\d+$/.test(raw) ? Number(raw) : raw;  // let the API explain a bad value
  }

  function createError(error) {
    const box = $("create-error");
    const list = $("create-error-fields");
    list.replaceChildren();
    if (!error) { show(box, false); return; }
    $("create-error-message").textContent = error.message;
    for (const line of error.fieldErrors ? error.fieldErrors() : []) {
      list.appendChild(el("li", { text: line }));
    }
    show(box, true);
  }

  async function submitCreate(event) {
    event.preventDefault();
    const body = {
      name: $("vm-name").value.trim(),
      image: $("vm-image").value,
      vcpus: integerField($("vm-vcpus")),
      memory_mb: integerField($("vm-memory")),
      disk_gb: integerField($("vm-disk")),
      user_data: $("vm-user-data").value,
    };
    for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
    const button = $("create-button");
    button.disabled = true;
    $("create-status").textContent = "submitting…";
    createError(null);
    try {
      const data = await api("POST", "/vms", body);
      touched.set(data.vm.id, performance.now());
      upsertVm(data.vm);
      $("create-status").textContent =
        `${data.vm.name} accepted${data.vm.host ? ` on ${data.vm.host}` : ""}`;
      $("vm-name").value = "";
      hostsRefreshSoon();
    } catch (err) {
      $("create-status").textContent = "";
      if (err.status !== 401) createError(err);
    } finally {
      button.disabled = false;
    }
  }

  /* ---------- hosts ---------- */

  function meter(used, total, unit) {
    const u = used || 0;
    const t = total || 0;
    const pct = t > 0 ? Math.min(100, Math.round((u / t) * 100)) : 0;
    const fill = el("div", { class: pct >= 85 ? "fill high" : "fill" });
    fill.style.width = `${pct}%`;
    const text = unit === "MiB" ? `${formatMiB(u)} / ${formatMiB(t)}` : `${u} / ${t}`;
    return el("div", { class: "meter" }, [
      el("div", { class: "bar" }, [fill]),
      el("span", { class: "txt", text }),
    ]);
  }

  function hostStatus(host) {
    if (!host.alive) return ["down", "down"];
    if (host.maintenance) return ["off", "maintenance"];
    if (host.enabled === false) return ["off", "disabled"];
    return ["alive", "alive"];
  }

  async function loadHosts() {
    const mine = session;
    const list = await api("GET", "/hosts");
    if (mine !== session) return;
    const body = $("host-rows");
    body.replaceChildren();
    for (const host of list) {
      const [kind, label] = hostStatus(host);
      const title = host.last_heartbeat ? `last heartbeat ${formatTime(host.last_heartbeat)}` : null;
      body.appendChild(el("tr", { dataset: { host: host.name, alive: String(Boolean(host.alive)) } }, [
        el("td", {}, [
          el("span", { class: "name", text: host.name }),
          el("span", { class: "sub", text: [host.arch, host.virt_type].filter(Boolean).join(" · ") }),
        ]),
        el("td", { title }, [el("span", { class: "badge", text: label, dataset: { state: kind } })]),
        el("td", {}, [meter(host.used_vcpus, host.vcpus, "")]),
        el("td", {}, [meter(host.used_memory_mb, host.memory_mb, "MiB")]),
      ]));
    }
    show($("hosts-empty"), list.length === 0);
    show($("hosts").tHead, list.length > 0);
  }

  function hostsRefreshSoon() {
    if (hostsSoon) return;
    hostsSoon = setTimeout(() => {
      hostsSoon = null;
      loadHosts().catch(() => {});
    }, 500);
  }

  /* ---------- the live event stream ---------- */

  function setLive(mode) {
    const live = $("live");
    live.dataset.live = mode;
    $("live-text").textContent = { on: "live", connecting: "connecting…", off: "offline" }[mode];
  }

  function handleEvent(event) {
    if (!event || typeof event !== "object") return;
    const type = String(event.type || "");
    if (event.vm_id) {
      if (type === "vm.deleted") removeVm(event.vm_id);
      else refreshVm(event.vm_id);
      hostsRefreshSoon();
    } else if (type.startsWith("host.")) {
      hostsRefreshSoon();
    }
  }

  /** Feed text to an SSE parser; calls onData(dataString) for each complete event. */
  function sseParser(onData) {
    let buffer = "";
    let data = [];
    return (chunk) => {
      buffer += chunk;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();  // an incomplete last line waits for more
      for (const line of lines) {
        if (line === "") {
          if (data.length) onData(data.join("\n"));
          data = [];
        } else if (line.startsWith(":")) {
          continue;  // a comment: keep-alive
        } else {
          const colon = line.indexOf(":");
          const field = colon === -1 ? line : line.slice(0, colon);
          let value = colon === -1 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "data") data.push(value);
        }
      }
    };
  }

  function startStream() {
    stopStream();
    stream = { ctrl: null, retryTimer: null, watchdog: null, backoff: BACKOFF_MIN_MS };
    connectStream(stream);
  }

  function stopStream() {
    if (!stream) return;
    const s = stream;
    stream = null;
    if (s.ctrl) s.ctrl.abort();
    clearTimeout(s.retryTimer);
    clearTimeout(s.watchdog);
    setLive("off");
  }

  async function connectStream(s) {
    if (stream !== s) return;
    const ctrl = new AbortController();
    s.ctrl = ctrl;
    setLive("connecting");
    const kick = () => {
      clearTimeout(s.watchdog);
      s.watchdog = setTimeout(() => ctrl.abort(), STREAM_SILENCE_MS);
    };
    let connectedAt = 0;
    try {
      kick();
      const response = await fetch(`${API}/events/stream`, {
        headers: { Accept: "text/event-stream", Authorization: `Bearer ${token}` },
        cache: "no-store", signal: ctrl.signal,
      });
      if (response.status === 401) {
        let message = "your token is no longer valid";
        try { message = (await response.json()).message || message; } catch (err) { /* keep */ }
        if (stream === s) signOut(message);
        return;
      }
      if (!response.ok || !response.body) throw new Error(`stream answered ${response.status}`);
      connectedAt = Date.now();
      setLive("on");
      // Whatever happened while we were not listening: read the list again.
      loadVms().catch((err) => { if (err.status !== 401) banner(`Could not list VMs: ${err.message}`); });
      loadHosts().catch(() => {});
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const feed = sseParser((text) => {
        try { handleEvent(JSON.parse(text)); } catch (err) { /* not JSON: ignore */ }
      });
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        kick();
        if (stream !== s) return;
        feed(decoder.decode(value, { stream: true }));
      }
    } catch (err) {
      // dropped, aborted by the watchdog or by sign-out: decided below
    } finally {
      clearTimeout(s.watchdog);
    }
    if (stream !== s) return;
    // A connection that lived a while resets the backoff; a flapping one backs off further.
    if (connectedAt && Date.now() - connectedAt > 10000) s.backoff = BACKOFF_MIN_MS;
    const wait = s.backoff + Math.floor(Math.random() * 250);
    s.backoff = Math.min(BACKOFF_MAX_MS, s.backoff * 2);
    setLive("connecting");
    $("live-text").textContent = `reconnecting in ${Math.round(wait / 1000)} s`;
    s.retryTimer = setTimeout(() => connectStream(s), wait);
  }

  /* ---------- sign in / out ---------- */

  function resetPage() {
    vms.clear();
    for (const row of rows.values()) row.remove();
    rows.clear();
    images.clear();
    vmFetches.clear();
    touched.clear();
    gone.clear();
    $("vm-image").replaceChildren();
    $("host-rows").replaceChildren();
    closeConsole();
    createError(null);
    banner("");
    $("create-status").textContent = "";
    clearInterval(hostsTimer);
    hostsTimer = null;
    clearTimeout(hostsSoon);
    hostsSoon = null;
  }

  function showSignIn(message) {
    show($("app"), false);
    show($("signout"), false);
    show($("signin"), true);
    $("signin-error").textContent = message || "";
    show($("signin-error"), Boolean(message));
    $("token").value = "";
    $("token").focus();
  }

  function signOut(message) {
    session += 1;
    token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    stopStream();
    resetPage();
    showSignIn(message);
  }

  async function enterApp() {
    session += 1;
    const mine = session;
    show($("signin"), false);
    show($("app"), true);
    show($("signout"), true);
    updateVmCount();
    try {
      await loadImages();
      await loadVms();
    } catch (err) {
      if (err.status !== 401 && mine === session) banner(`Could not load: ${err.message}`);
    }
    if (mine !== session) return;
    loadHosts().catch(() => {});
    hostsTimer = setInterval(() => {
      if (!document.hidden) loadHosts().catch(() => {});
    }, HOSTS_POLL_MS);
    startStream();
  }

  async function submitSignIn(event) {
    event.preventDefault();
    const candidate = $("token").value.trim();
    if (!candidate) { showSignIn("enter an API token"); return; }
    const button = $("signin-button");
    button.disabled = true;
    token = candidate;
    try {
      await api("GET", "/vms", undefined, { signingIn: true });
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token").value = "";
      await enterApp();
    } catch (err) {
      token = "";
      $("signin-error").textContent = err.message;
      show($("signin-error"), true);
    } finally {
      button.disabled = false;
    }
  }

  /* ---------- wiring ---------- */

  document.addEventListener("DOMContentLoaded", () => {
    $("signin-form").addEventListener("submit", submitSignIn);
    $("signout").addEventListener("click", () => signOut(""));
    $("create-form").addEventListener("submit", submitCreate);
    $("vms-refresh").addEventListener("click", () => {
      loadVms().catch((err) => { if (err.status !== 401) banner(`Could not list VMs: ${err.message}`); });
    });
    $("hosts-refresh").addEventListener("click", () => loadHosts().catch(() => {}));
    $("console-refresh").addEventListener("click", loadConsole);
    $("console-close").addEventListener("click", closeConsole);
    $("console-live").addEventListener("click", () => {
      if (liveConsole) stopLiveConsole();
      else startLiveConsole();
    });
    $("console-input-form").addEventListener("submit", submitConsoleInput);
    $("console-ctrl-c").addEventListener("click", () => {
      sendConsole("\x03");
      $("console-input").focus();
    });
    $("banner").addEventListener("click", () => banner(""));
    setLive("off");
    if (token) enterApp();
    else showSignIn("");
  });
})();
