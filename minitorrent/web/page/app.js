// The MiniTorrent page: plain JavaScript, no build step, no framework, works offline.
// It reads the JSON API (/api/v1) and refreshes the status and the log every REFRESH_MS.
"use strict";

const REFRESH_MS = 2000;
const PAGE_LIMIT = 500;        // rows fetched per search; the note says when there are more
const SEARCH_DELAY_MS = 150;   // typing pauses this long before a search is sent

const TOKEN_KEY = "minitorrent-token";  // server.access: paired: this browser's token, kept in localStorage

const state = { files: [], total: 0, sortKey: "name", sortDir: 1, search: "", logAfter: 0, searchSeq: 0 };
const $ = (id) => document.getElementById(id);

class NotPaired extends Error {}

function humanSize(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return (unit === 0 ? value.toFixed(0) : value.toFixed(1)) + " " + units[unit];
}
const humanRate = (bps) => humanSize(bps) + "/s";
const humanDate = (unix) => new Date(unix * 1000).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });

// Token (server.access: paired) ------------------------------------------------------------

function token() {
  return localStorage.getItem(TOKEN_KEY) || "";
}

// A link that works on its own (a download, curl, a BitTorrent client): the token rides in the query.
function withToken(href) {
  return token() ? href + (href.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token()) : href;
}

function takeTokenFromAddress() {
  const address = new URL(location.href);
  const given = address.searchParams.get("token");
  if (!given) return;
  localStorage.setItem(TOKEN_KEY, given);
  address.searchParams.delete("token");
  history.replaceState(null, "", address);  // out of the address bar, the history and bookmarks
}

function askForToken(refused) {
  $("token-box").hidden = false;
  $("token-error").textContent = refused ? "That token was refused: it may be revoked, or for another server." : "";
  $("token-input").focus();
}

function setUpToken() {
  takeTokenFromAddress();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    $("token-input").value = "";
    $("token-box").hidden = true;
    reloadAll();
  });
  $("forget-token").addEventListener("click", () => { localStorage.removeItem(TOKEN_KEY); location.reload(); });
  showTokenLinks();
}

function showTokenLinks() {
  $("token-forget").hidden = !token();
  for (const a of document.querySelectorAll("a[data-token]")) a.href = withToken(a.getAttribute("href").split("?")[0]);
}

async function getJson(path) {
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  const response = await fetch(path, { cache: "no-store", headers });
  const body = await response.json();
  if (response.status === 401) throw new NotPaired(body.error ? body.error.message : "not paired");
  if (!response.ok) throw new Error(body.error ? body.error.code + ": " + body.error.message : response.statusText);
  return body;
}

function showTrouble(error) {
  if (!(error instanceof NotPaired)) return showOffline();
  askForToken(Boolean(token()));
  $("live").textContent = "token needed";
  $("live").classList.add("stale");
}

// Catalog ------------------------------------------------------------------------------

async function loadFiles() {
  const seq = ++state.searchSeq;  // an older, slower answer must not overwrite a newer one
  const query = new URLSearchParams({ search: state.search, limit: String(PAGE_LIMIT) });
  const body = await getJson("/api/v1/files?" + query);
  if (seq !== state.searchSeq) return;
  state.files = body.files;
  state.total = body.total;
  renderFiles();
}

function sortedFiles() {
  const key = state.sortKey, dir = state.sortDir;
  return state.files.slice().sort((a, b) => {
    const x = a[key], y = b[key];
    const order = typeof x === "string" ? x.localeCompare(y, undefined, { sensitivity: "base", numeric: true }) : x - y;
    return order * dir;
  });
}

function cell(className, ...children) {
  const td = document.createElement("td");
  td.className = className;
  td.append(...children);
  return td;
}

function link(href, text, className) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  if (className) a.className = className;
  return a;
}

function copyButton(text) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.title = "Copy the full SHA-256";
  button.addEventListener("click", () => copyText(text).then(() => {
    button.textContent = "Copied";
    button.classList.add("done");
    setTimeout(() => { button.textContent = "Copy"; button.classList.remove("done"); }, 1500);
  }));
  return button;
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  const area = document.createElement("textarea");  // plain http on a LAN address: the old way
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

function fileRow(file) {
  const tr = document.createElement("tr");
  const name = link(withToken(file.links.download), file.name);
  name.setAttribute("download", file.name);
  const hash = document.createElement("div");
  hash.className = "hash";
  const code = document.createElement("code");
  code.textContent = file.sha256.slice(0, 16) + "…";
  code.title = file.sha256;
  hash.append(code, copyButton(file.sha256));
  tr.append(cell("name", name, link(withToken(file.links.torrent), ".torrent", "torrent")),
            cell("size num", humanSize(file.size)), cell("added", humanDate(file.added_at)),
            cell("downloads num", String(file.downloads)), cell("hash-cell", hash));
  tr.dataset.name = file.name;
  return tr;
}

function renderFiles() {
  $("rows").replaceChildren(...sortedFiles().map(fileRow));
  const shown = state.files.length;
  let note = "";
  if (state.total === 0) note = state.search ? "No file name contains “" + state.search + "”." : "No files are shared yet.";
  else if (shown < state.total) note = "Showing " + shown + " of " + state.total + " matches: type more to narrow the search.";
  $("files-note").textContent = note;
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.setAttribute("aria-sort", th.dataset.sort === state.sortKey ? (state.sortDir > 0 ? "ascending" : "descending") : "none");
  }
}

function setUpCatalog() {
  let timer = null;
  $("search").addEventListener("input", (event) => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.search = event.target.value; loadFiles().catch(showTrouble); }, SEARCH_DELAY_MS);
  });
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.sort;
      state.sortDir = state.sortKey === key ? -state.sortDir : (key === "name" ? 1 : -1);
      state.sortKey = key;
      renderFiles();
    });
  }
}

// Status and log -------------------------------------------------------------------------

function renderLink(status) {
  if (status.backup) {
    $("link-label").textContent = "Backup";
    const backup = status.backup;
    if (!backup.replicating) { $("link-state").textContent = "Not replicating"; $("link-detail").textContent = "server.secret is empty"; return; }
    $("link-state").textContent = backup.in_sync ? "In sync" : (backup.connected ? "Catching up" : "Unreachable");
    $("link-detail").textContent = backup.address + " · " + (backup.files_pending || 0) + " files, " +
      humanSize(backup.bytes_pending || 0) + " behind";
  } else if (status.main) {
    $("link-label").textContent = "Main server";
    $("link-state").textContent = "Last heartbeat " + status.main.seconds_since_heartbeat.toFixed(1) + " s ago";
    $("link-detail").textContent = status.main.address + " · takes over after " + status.main.heartbeat_timeout_s + " s";
  }
}

function renderStatus(status) {
  $("server-name").textContent = status.server + " server";
  $("server-name").title = "server id " + status.server_id;
  const role = $("role");
  role.textContent = status.role;
  role.className = "badge" + (status.role === "active" ? " active" : "");
  role.title = status.role === "active" ? "This server serves clients" : "Standby; the active server is " + (status.primary || "unknown");
  $("epoch").textContent = "epoch " + status.epoch;
  $("files-count").textContent = String(status.files);
  $("files-bytes").textContent = humanSize(status.total_bytes);
  const http = status.http || { upload_bps: 0, bytes_sent: 0, active_connections: 0 };
  $("upload-rate").textContent = humanRate(status.upload_bps + http.upload_bps);
  $("upload-total").textContent = humanSize(status.bytes_sent + http.bytes_sent) + " sent";
  $("download-rate").textContent = humanRate(status.download_bps);
  $("download-total").textContent = humanSize(status.bytes_received) + " received";
  $("peers").textContent = String(status.seeding_peers);
  $("connections").textContent = (status.active_connections + http.active_connections) + " connections";
  renderLink(status);
  $("live").textContent = "live";
  $("live").classList.remove("stale");
}

async function refreshLog() {
  const body = await getJson("/api/v1/log?after=" + state.logAfter);
  const list = $("log-lines");
  for (const line of body.lines) {
    const item = document.createElement("li");
    item.className = line.level;
    item.textContent = new Date(line.time * 1000).toLocaleTimeString() + " " + line.level + " " + line.message;
    list.prepend(item);
    state.logAfter = line.seq;
  }
  while (list.children.length > 200) list.lastElementChild.remove();
}

function showOffline() {
  $("live").textContent = "offline";
  $("live").classList.add("stale");
}

async function refresh() {
  if (!$("token-box").hidden) return;  // waiting for a token: asking again would only be refused again
  try {
    renderStatus(await getJson("/api/v1/status"));
    await refreshLog();
  } catch (error) {
    showTrouble(error);
  }
}

function reloadAll() {
  showTokenLinks();
  loadFiles().catch(showTrouble);
  refresh();
}

setUpToken();
setUpCatalog();
reloadAll();
setInterval(refresh, REFRESH_MS);
setInterval(() => { if ($("token-box").hidden) loadFiles().catch(showTrouble); }, REFRESH_MS * 5);  // new files, counts
