"""
The status page at ``/_vault/``: one self-contained HTML document (inline
CSS and JS, nothing loaded from elsewhere) for an operator's browser.

The server renders the page with the numbers of `status` already
in it, so it is useful without JS (and to ``curl``).  Its script then asks
``status.json`` (a relative URL: the page also works behind a reverse proxy
that adds a path prefix) every second and redraws the same sections from the
answer with DOM calls only, so nothing a client chose (file names, paths in
error messages) is ever parsed as markup; on the server every value goes
through `html.escape`.  A Content-Security-Policy with a per-render nonce
allows only this page's own script to run.

The body's ``data-updates`` counts the redraws from ``status.json`` since the
page loaded (the headless-browser test reads it).

With ``peers:`` configured, the page has a Cluster section too: this vault and
each peer, up or down, with their numbers (`cluster.cluster_view`), served
alone as ``/_vault/cluster.json`` and refreshed from there.
"""

import html
import json
import os
import secrets
import time

from .cluster import cluster_view
from .errors import NotFound
from .serve import send_small
from .site import VaultPage, is_admin, send_json

OUTCOMES = ("hit", "miss", "joined", "stale", "forwarded", "error")
#: shown instead of a file or request name to those without the admin token
HIDDEN = "(name shown with the admin token)"


class StatusPage(VaultPage):
    """``/_vault/``: the page."""

    def __init__(self, machinery):
        super().__init__()
        self.machinery = machinery

    def answer(self, request):
        if not request.path.endswith(b"/"):
            raise NotFound("unknown status page")
        document = status(self.machinery, names=is_admin(self.machinery, request))
        if self.machinery.peers is None:
            return self.send(request, document, None)
        return cluster_view(self.machinery, document).addCallback(lambda view: self.send(request, document, view))

    def send(self, request, document, cluster):
        caps = {b.name: b.config.max_cache_size for b in self.machinery.backends}
        nonce = secrets.token_urlsafe(16)
        body = page(document, caps, nonce, cluster).encode("utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"content-security-policy", (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'").encode())
        send_small(request, b"text/html; charset=utf-8", body)


class StatusJson(VaultPage):
    """``/_vault/status.json``: what the page shows, for its script and for scripts of others."""

    def __init__(self, machinery):
        super().__init__()
        self.machinery = machinery

    def answer(self, request):
        send_json(request, status(self.machinery, names=is_admin(self.machinery, request)))


class ClusterJson(VaultPage):
    """
    ``/_vault/cluster.json``: this vault and its peers, numbers only (no names,
    so no admin token is involved); 404 without ``peers:``.
    """

    def __init__(self, machinery):
        super().__init__()
        self.machinery = machinery

    def answer(self, request):
        if self.machinery.peers is None:
            raise NotFound("this vault has no peers (see peers: in its configuration)")
        return cluster_view(self.machinery, status(self.machinery)).addCallback(
            lambda view: send_json(request, view))


def status(machinery, names: bool = False) -> dict:
    """
    What the status page shows: use, hit ratio, downloads in flight, recent
    errors.  The names of files being downloaded and of the requests that
    failed (private repo and file names) only with `names`, which callers
    grant to holders of the admin token; others see counts.
    """
    metrics = machinery.metrics
    totals = metrics.totals() if metrics else {}
    answered = sum(totals.values())
    from_cache = totals.get("hit", 0) + totals.get("stale", 0)
    now = time.monotonic()
    downloads = []
    for d in machinery.downloads.running():
        elapsed = max(now - d.started_at, 1e-3)
        got = d.available()
        downloads.append({
            **({"name": d.label} if names else {}), "bytes": got, "total": d.size,
            "percent": round(100 * got / d.size, 1) if d.size else None,
            "rate": round(got / elapsed), "clients": d.watcher_count, "seconds": round(elapsed, 1),
        })
    usage = machinery.janitor.usage if machinery.janitor is not None else {}
    return {
        "pid": os.getpid(),
        "instance": machinery.instance,
        "uptime_seconds": round(time.time() - machinery.started, 1),
        "backends": [{"name": b.name, "type": b.config.type, "prefix": b.config.prefix} for b in machinery.backends],
        "requests": totals,
        "hit_ratio": round(from_cache / answered, 3) if answered else None,
        "cache": usage or {},
        "downloads": downloads,
        "recent_errors": [e if names else {"time": e["time"], "status": e["status"]}
                          for e in (metrics.recent_errors if metrics else [])],
    }


# -- formatting (the script has the same functions, in JS) ------------------------


def human_bytes(n) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def clock(t) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else ""


def ratio(r) -> str:
    return "–" if r is None else f"{100 * r:.1f} %"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _plural(n, word) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# -- sections -------------------------------------------------------------------------


def summary_html(s: dict) -> str:
    cache = s.get("cache") or {}
    used = human_bytes(cache["bytes"]) if "bytes" in cache else "not measured yet"
    if cache.get("max_bytes"):
        used += f" of {human_bytes(cache['max_bytes'])}"
    cards = [
        ("Cache used", used, "cache-bytes"),
        ("Files", str(cache.get("files", "–")), "cache-files"),
        ("Hit ratio", ratio(s.get("hit_ratio")), "hit-ratio"),
        ("Downloads in flight", str(len(s.get("downloads") or [])), "inflight"),
    ]
    return "".join(f'<div class="card"><div class="label">{_e(label)}</div>'
                   f'<div class="value" id="{key}">{_e(value)}</div></div>' for label, value, key in cards)


def backends_html(s: dict, caps: dict) -> str:
    per = (s.get("cache") or {}).get("backends") or {}
    rows = []
    for b in s.get("backends") or []:
        u = per.get(b["name"], {})
        cap = caps.get(b["name"])
        rows.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in (
            b["name"], b["type"], b["prefix"], human_bytes(u.get("bytes", 0)), u.get("files", 0),
            human_bytes(cap) if cap else "–")) + "</tr>")
    return "".join(rows) or '<tr><td colspan="6" class="empty">No backends.</td></tr>'


def requests_html(s: dict) -> str:
    totals = s.get("requests") or {}
    names = list(OUTCOMES) + sorted(k for k in totals if k not in OUTCOMES)
    return "".join(f'<tr><td>{_e(name)}</td><td class="num">{int(totals.get(name, 0))}</td></tr>' for name in names)


def download_facts(d: dict) -> str:
    amount = human_bytes(d.get("bytes"))
    if d.get("total") is not None:
        amount += f" of {human_bytes(d['total'])}"
    return " · ".join([amount, human_bytes(d.get("rate")) + "/s", _plural(d.get("clients", 0), "client"),
                       f"{d.get('seconds', 0)} s"])


def percent_text(d: dict) -> str:
    return "size unknown" if d.get("percent") is None else f"{d['percent']:.1f} %"


def downloads_html(s: dict) -> str:
    items = []
    for d in s.get("downloads") or []:
        pct = d.get("percent")
        bar = (f'<progress max="100" value="{_e(pct)}">{_e(percent_text(d))}</progress>' if pct is not None
               else '<progress max="100"></progress>')
        items.append(
            '<li class="download">'
            f'<div class="dl-head"><span class="dl-name">{_e(d.get("name", HIDDEN))}</span>'
            f'<span class="dl-pct">{_e(percent_text(d))}</span></div>'
            f'{bar}<div class="dl-facts">{_e(download_facts(d))}</div></li>')
    return "".join(items) or '<li class="empty">No downloads in flight.</li>'


def errors_html(s: dict) -> str:
    rows = []
    for err in s.get("recent_errors") or []:
        rows.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in (
            clock(err.get("time")), err.get("status", ""), err.get("what", HIDDEN), err.get("message", ""))) + "</tr>")
    return "".join(rows) or '<tr><td colspan="4" class="empty">No errors recently.</td></tr>'


CLUSTER_COLUMNS = ("Vault", "State", "Up for", "Requests", "Hit ratio", "Cache", "Files", "Downloads", "Errors")


def cluster_cells(node: dict) -> list:
    """One row of the Cluster table (the script has the same function)."""
    if node.get("self"):
        name = "this vault" + (f" ({node['url']})" if node.get("url") else "")
    else:
        name = node.get("url") or ""
    if not node.get("up"):
        return [name, "down: " + str(node.get("error", "")), "", "", "", "", "", "", ""]
    cache = node.get("cache") or {}
    uptime = node.get("uptime_seconds")
    return [name, "up", "" if uptime is None else f"{int(uptime)} s",
            str(int(sum((node.get("requests") or {}).values()))), ratio(node.get("hit_ratio")),
            human_bytes(cache["bytes"]) if "bytes" in cache else "not measured yet",
            str(cache.get("files", "–")), str(node.get("downloads", "–")), str(node.get("errors", "–"))]


def cluster_total_cells(total: dict) -> list:
    cache = total.get("cache") or {}
    return [f"cluster: {total.get('up', 0)} of {total.get('nodes', 0)} up", "", "",
            str(int(sum((total.get("requests") or {}).values()))), ratio(total.get("hit_ratio")),
            human_bytes(cache["bytes"]) if "bytes" in cache else "not measured yet",
            str(cache.get("files", "–")), str(total.get("downloads", 0)), str(total.get("errors", 0))]


def cluster_html(view: dict) -> str:
    def row(cells, cls=None):
        attribute = f' class="{cls}"' if cls else ""
        return f"<tr{attribute}>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"

    rows = "".join(row(cluster_cells(n), None if n.get("up") else "down") for n in view["nodes"])
    head = "".join(f"<th>{_e(c)}</th>" for c in CLUSTER_COLUMNS)
    total = row(cluster_total_cells(view["total"]), "total")
    return ('<h2>Cluster</h2>\n<table><thead><tr>' + head + '</tr></thead>\n'
            '<tbody id="cluster">' + rows + '</tbody>\n<tfoot id="cluster-total">' + total + '</tfoot></table>')


def facts_text(s: dict) -> str:
    return f"pid {s.get('pid')} · up {int(s.get('uptime_seconds') or 0)} s"


def page(status: dict, caps: dict, nonce: str, cluster: dict | None = None) -> str:
    caps_json = json.dumps(caps).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Artifact Vault</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; padding: 0 1em;
       color: #1d2330; background: #f7f8fa; }}
h1 {{ font-size: 1.4em; margin: 0; }}
h2 {{ font-size: 1.1em; margin: 1.5em 0 .5em; }}
header {{ display: flex; justify-content: space-between; align-items: baseline; flex-wrap: wrap; gap: 1em; }}
#live {{ color: #667; font-size: .9em; }}
#live.failed {{ color: #b3261e; }}
.cards {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(12em, 1fr)); gap: .8em; margin-top: 1em; }}
.card {{ background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: .7em 1em; }}
.card .label {{ color: #667; font-size: .85em; }}
.card .value {{ font-size: 1.3em; font-weight: 600; }}
table {{ border-collapse: collapse; width: 100%; background: #fff; border: 1px solid #dde1e8; }}
th, td {{ text-align: left; padding: .35em .7em; border-bottom: 1px solid #eceef2; vertical-align: top; }}
th {{ background: #eef0f4; font-weight: 600; }}
td.num, th.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
td {{ overflow-wrap: anywhere; }}
.empty {{ color: #889; font-style: italic; }}
ul#downloads {{ list-style: none; padding: 0; margin: 0; }}
li.download {{ background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: .6em 1em; margin-bottom: .5em; }}
.dl-head {{ display: flex; justify-content: space-between; gap: 1em; }}
.dl-name {{ font-family: ui-monospace, monospace; overflow-wrap: anywhere; }}
.dl-pct {{ font-weight: 600; white-space: nowrap; }}
progress {{ width: 100%; height: 1em; margin: .3em 0; }}
.dl-facts {{ color: #556; font-size: .9em; }}
tr.down td {{ color: #b3261e; }}
tr.total td {{ font-weight: 600; background: #eef0f4; }}
</style>
</head>
<body data-updates="0">
<header><h1>Artifact Vault</h1><span id="facts">{_e(facts_text(status))}</span>
<span id="live">as of {_e(clock(time.time()))}</span></header>
<div class="cards" id="summary">{summary_html(status)}</div>
{cluster_html(cluster) if cluster is not None else ""}
<h2>Downloads in flight</h2>
<ul id="downloads">{downloads_html(status)}</ul>
<h2>Cache by backend</h2>
<table><thead><tr><th>Backend</th><th>Type</th><th>Prefix</th><th>Bytes</th><th>Files</th><th>Cap</th></tr></thead>
<tbody id="backends">{backends_html(status, caps)}</tbody></table>
<h2>Requests by outcome</h2>
<table><thead><tr><th>Outcome</th><th class="num">Requests</th></tr></thead>
<tbody id="requests">{requests_html(status)}</tbody></table>
<h2>Recent errors</h2>
<table><thead><tr><th>Time</th><th>Status</th><th>Request</th><th>Message</th></tr></thead>
<tbody id="errors">{errors_html(status)}</tbody></table>
<script type="application/json" id="caps">{caps_json}</script>
<script nonce="{_e(nonce)}">
{SCRIPT}
</script>
</body>
</html>
"""


SCRIPT = r"""
(function () {
  "use strict";
  var OUTCOMES = ["hit", "miss", "joined", "stale", "forwarded", "error"];
  var HIDDEN = "(name shown with the admin token)";
  var caps = JSON.parse(document.getElementById("caps").textContent);
  var updates = 0;

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function row(values) {
    var tr = el("tr");
    values.forEach(function (v) { tr.appendChild(el("td", v)); });
    return tr;
  }
  function fill(id, nodes, empty, colspan) {
    var parent = document.getElementById(id);
    while (parent.firstChild) parent.removeChild(parent.firstChild);
    if (!nodes.length && empty) {
      if (colspan) {
        var tr = el("tr"), td = el("td", empty, "empty");
        td.colSpan = colspan; tr.appendChild(td); nodes = [tr];
      } else {
        nodes = [el("li", empty, "empty")];
      }
    }
    nodes.forEach(function (n) { parent.appendChild(n); });
  }
  function humanBytes(n) {
    if (n === null || n === undefined) return "?";
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    for (var i = 0; i < units.length; i++) {
      if (Math.abs(n) < 1024 || i === units.length - 1)
        return i === 0 ? Math.floor(n) + " B" : n.toFixed(1) + " " + units[i];
      n /= 1024;
    }
  }
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function clock(t) {
    if (!t) return "";
    var d = new Date(t * 1000);
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }
  function ratio(r) { return r === null || r === undefined ? "\u2013" : (100 * r).toFixed(1) + " %"; }
  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }
  function percentText(d) {
    return d.percent === null || d.percent === undefined ? "size unknown" : d.percent.toFixed(1) + " %";
  }
  function downloadFacts(d) {
    var amount = humanBytes(d.bytes);
    if (d.total !== null && d.total !== undefined) amount += " of " + humanBytes(d.total);
    return [amount, humanBytes(d.rate) + "/s", plural(d.clients || 0, "client"), (d.seconds || 0) + " s"]
      .join(" \u00b7 ");
  }

  function render(s) {
    var cache = s.cache || {};
    var used = "bytes" in cache ? humanBytes(cache.bytes) : "not measured yet";
    if (cache.max_bytes) used += " of " + humanBytes(cache.max_bytes);
    document.getElementById("cache-bytes").textContent = used;
    document.getElementById("cache-files").textContent = "files" in cache ? String(cache.files) : "\u2013";
    document.getElementById("hit-ratio").textContent = ratio(s.hit_ratio);
    document.getElementById("inflight").textContent = String((s.downloads || []).length);
    document.getElementById("facts").textContent =
      "pid " + s.pid + " \u00b7 up " + Math.floor(s.uptime_seconds || 0) + " s";

    fill("downloads", (s.downloads || []).map(function (d) {
      var li = el("li", null, "download"), head = el("div", null, "dl-head");
      head.appendChild(el("span", d.name || HIDDEN, "dl-name"));
      head.appendChild(el("span", percentText(d), "dl-pct"));
      var bar = el("progress");
      bar.max = 100;
      if (d.percent !== null && d.percent !== undefined) {
        bar.value = d.percent;
        bar.textContent = percentText(d);
        bar.setAttribute("value", String(d.percent));
      }
      li.appendChild(head);
      li.appendChild(bar);
      li.appendChild(el("div", downloadFacts(d), "dl-facts"));
      return li;
    }), "No downloads in flight.");

    var per = cache.backends || {};
    fill("backends", (s.backends || []).map(function (b) {
      var u = per[b.name] || {}, cap = caps[b.name];
      return row([b.name, b.type, b.prefix, humanBytes(u.bytes || 0), u.files || 0, cap ? humanBytes(cap) : "\u2013"]);
    }), "No backends.", 6);

    var totals = s.requests || {};
    var names = OUTCOMES.concat(Object.keys(totals).filter(function (k) { return OUTCOMES.indexOf(k) < 0; }).sort());
    fill("requests", names.map(function (name) {
      var tr = el("tr");
      tr.appendChild(el("td", name));
      tr.appendChild(el("td", Math.floor(totals[name] || 0), "num"));
      return tr;
    }));

    fill("errors", (s.recent_errors || []).map(function (e) {
      return row([clock(e.time), e.status, e.what || HIDDEN, e.message || ""]);
    }), "No errors recently.", 4);
  }

  function sum(values) {
    var total = 0;
    Object.keys(values || {}).forEach(function (k) { total += values[k]; });
    return total;
  }
  function clusterCells(n) {
    var name = n.self ? "this vault" + (n.url ? " (" + n.url + ")" : "") : (n.url || "");
    if (!n.up) return [name, "down: " + (n.error || ""), "", "", "", "", "", "", ""];
    var cache = n.cache || {};
    return [name, "up", n.uptime_seconds === null || n.uptime_seconds === undefined ? "" :
              Math.floor(n.uptime_seconds) + " s",
            String(Math.floor(sum(n.requests))), ratio(n.hit_ratio),
            "bytes" in cache ? humanBytes(cache.bytes) : "not measured yet",
            "files" in cache ? String(cache.files) : "\u2013",
            n.downloads === null || n.downloads === undefined ? "\u2013" : String(n.downloads),
            n.errors === null || n.errors === undefined ? "\u2013" : String(n.errors)];
  }
  function clusterTotalCells(t) {
    var cache = t.cache || {};
    return ["cluster: " + (t.up || 0) + " of " + (t.nodes || 0) + " up", "", "",
            String(Math.floor(sum(t.requests))), ratio(t.hit_ratio),
            "bytes" in cache ? humanBytes(cache.bytes) : "not measured yet",
            "files" in cache ? String(cache.files) : "\u2013", String(t.downloads || 0), String(t.errors || 0)];
  }
  function renderCluster(view) {
    fill("cluster", (view.nodes || []).map(function (n) {
      var tr = row(clusterCells(n));
      if (!n.up) tr.className = "down";
      return tr;
    }));
    var total = row(clusterTotalCells(view.total || {}));
    total.className = "total";
    fill("cluster-total", [total]);
  }
  function refreshCluster() {
    if (!document.getElementById("cluster")) return null;
    return fetch("cluster.json", {cache: "no-store", credentials: "same-origin"})
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(renderCluster);
  }

  function live(text, failed) {
    var node = document.getElementById("live");
    node.textContent = text;
    node.className = failed ? "failed" : "";
  }

  function refresh() {
    fetch("status.json", {cache: "no-store", credentials: "same-origin"})
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (s) {
        render(s);
        return refreshCluster();
      })
      .then(function () {
        updates += 1;
        document.body.setAttribute("data-updates", String(updates));
        live("live \u00b7 " + clock(Date.now() / 1000), false);
      })
      .catch(function (e) { live("refresh failed: " + e.message, true); })
      .then(function () { setTimeout(refresh, 1000); });
  }
  setTimeout(refresh, 1000);
})();
"""
