"""
``artifact-vault``: steer a running vault over HTTP through its admin
endpoints (`artifact_vault.admin`).

    artifact-vault [--url URL] [--token T] COMMAND ...
      prefetch huggingface ORG/REPO[@REV] [--include GLOB ...] [--repo-type model|dataset|space]
      purge BACKEND [PREFIX]
      ls [BACKEND] [PREFIX] [--json]
      stats [--json]          (with peers: in the vault's config, the whole cluster too)

``--url`` defaults to ``$ARTIFACT_VAULT_URL`` or http://localhost:8080, the
admin token to ``$ARTIFACT_VAULT_ADMIN_TOKEN``; it is sent as
``X-Admin-Token``.  A vault that also wants an access token gets
``--access-token`` (``$ARTIFACT_VAULT_ACCESS_TOKEN``) as ``X-Vault-Token``.
``prefetch`` passes ``--hub-token`` (default ``$HF_TOKEN``) for the hub.

Exit status: 0 done, 1 the call failed (or some prefetched files failed),
2 usage error.  Standard library only (urllib), so it runs wherever Python
does.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from .status_page import human_bytes as _human_bytes

DEFAULT_URL = "http://localhost:8080"


class CallFailed(Exception):
    """One line for stderr."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="artifact-vault", description="Steer a running Artifact Vault.")
    parser.add_argument("--url", default=os.environ.get("ARTIFACT_VAULT_URL") or DEFAULT_URL,
                        help="the vault's base URL (default: $ARTIFACT_VAULT_URL or %(default)s)")
    parser.add_argument("--token", default=os.environ.get("ARTIFACT_VAULT_ADMIN_TOKEN"),
                        help="the admin token (default: $ARTIFACT_VAULT_ADMIN_TOKEN)")
    parser.add_argument("--access-token", default=os.environ.get("ARTIFACT_VAULT_ACCESS_TOKEN"),
                        help="an access token, for a vault with access_tokens (default: $ARTIFACT_VAULT_ACCESS_TOKEN)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for an answer (default: 60; none for prefetch)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("prefetch", help="warm the cache with a whole snapshot of a repo")
    p.add_argument("backend", help="the Hugging Face backend's name (huggingface)")
    p.add_argument("repo", metavar="ORG/REPO[@REV]")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only files whose path matches (repeatable; default: every file)")
    p.add_argument("--repo-type", choices=("model", "dataset", "space"), default="model")
    p.add_argument("--hub-token", default=os.environ.get("HF_TOKEN"),
                   help="token for the hub, for private or gated repos (default: $HF_TOKEN)")

    p = commands.add_parser("purge", help="remove cache entries of a backend")
    p.add_argument("backend")
    p.add_argument("prefix", nargs="?", default="", help="only keys below the backend starting with this")

    p = commands.add_parser("ls", help="list cache entries")
    p.add_argument("backend", nargs="?", default="")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")

    p = commands.add_parser("stats", help="show cache use, hit ratio and downloads in flight (and, for a vault "
                                          "with peers:, every vault of the cluster)")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    return parser


#: headers that carry a secret: they go to the vault's own origin only
SECRET_HEADERS = ("x-admin-token", "x-vault-token", "x-hub-authorization", "authorization")


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect, but never take the tokens to another scheme, host or port."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            for name in list(new.headers):
                if name.lower() in SECRET_HEADERS:
                    del new.headers[name]
        return new


def _origin(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


_OPENER = urllib.request.build_opener(_SameOriginRedirects)


def call(args, method: str, endpoint: str, query=None, body=None, headers=None, timeout=60.0):
    """One admin call: the decoded JSON answer, or CallFailed with the status and message."""
    url = args.url.rstrip("/") + "/_vault/admin/" + endpoint
    query = {k: v for k, v in (query or {}).items() if v}
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if args.token:
        request.add_header("X-Admin-Token", args.token)
    if args.access_token:
        request.add_header("X-Vault-Token", args.access_token)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    if args.timeout is not None:
        timeout = args.timeout
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        text = e.read().decode("utf-8", "replace").strip()
        first = text.splitlines()[0] if text else e.reason
        first = first.removeprefix(f"{e.code} ")
        raise CallFailed(f"{method} {endpoint} failed: HTTP {e.code}: {first}") from None
    except urllib.error.URLError as e:
        raise CallFailed(f"cannot reach the vault at {args.url}: {e.reason}") from None
    except (OSError, ValueError) as e:
        raise CallFailed(f"cannot reach the vault at {args.url}: {e}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise CallFailed(f"{method} {endpoint}: the answer is not JSON (is {args.url} a vault?)") from None


# -- output -------------------------------------------------------------------------


def human_bytes(n) -> str:
    return "-" if n is None else _human_bytes(n)


def _plural(n, one, many) -> str:
    return f"{n} {one if n == 1 else many}"


def when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def table(rows, headers, right=()) -> str:
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    lines = []
    for r in [headers] + rows:
        cells = [str(v).rjust(w) if i in right else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def show_ls(answer) -> str:
    rows = [[human_bytes(e["size"]), when(e["last_used"]), e["key"]] for e in answer["entries"]]
    out = table(rows, ["SIZE", "LAST USED", "KEY"], right=(0,)) if rows else "(no entries)"
    total = sum(e["size"] for e in answer["entries"])
    out += f"\n{_plural(len(rows), 'entry', 'entries')}, {human_bytes(total)}"
    if answer.get("truncated"):
        out += " (truncated: narrow it with a prefix)"
    return out


def show_stats(s) -> str:
    usage = s.get("usage") or {}
    cap = f" of {human_bytes(usage['max_bytes'])}" if usage.get("max_bytes") else ""
    ratio = "-" if s.get("hit_ratio") is None else f"{100 * s['hit_ratio']:.1f}%"
    lines = [
        f"cache:      {human_bytes(usage.get('bytes', 0))}{cap} in {usage.get('files', 0)} files",
        f"hit ratio:  {ratio}",
        "requests:   " + ", ".join(f"{k} {int(v)}" for k, v in (s.get("requests") or {}).items()),
        f"uptime:     {int(s.get('uptime_seconds') or 0)} s (pid {s.get('pid')})",
        "",
        table([[name, human_bytes(u.get("bytes", 0)), u.get("files", 0),
                human_bytes(u["max_bytes"]) if u.get("max_bytes") else "-"]
               for name, u in sorted((usage.get("backends") or {}).items())],
              ["BACKEND", "BYTES", "FILES", "CAP"], right=(1, 2, 3)),
    ]
    downloads = s.get("downloads") or []
    lines += ["", f"downloads in flight: {len(downloads)}"]
    for d in downloads:
        pct = "?" if d.get("percent") is None else f"{d['percent']:.1f}%"
        lines.append(f"  {pct:>6}  {human_bytes(d.get('bytes'))} of {human_bytes(d.get('total'))}"
                     f"  {human_bytes(d.get('rate'))}/s  {d.get('clients', 0)} clients  {d.get('name')}")
    errors = s.get("recent_errors") or []
    if errors:
        lines += ["", "recent errors:"]
        lines += [f"  {when(e.get('time'))}  {e.get('status')}  {e.get('what')}: {e.get('message')}"
                  for e in errors[:10]]
    if s.get("cluster"):
        lines += ["", show_cluster(s["cluster"])]
    return "\n".join(lines)


def show_cluster(view) -> str:
    """The vaults of the cluster (this one first), one line each, and their sums."""

    def ratio_of(r):
        return "-" if r is None else f"{100 * r:.1f}%"

    def cache_of(c):
        return human_bytes(c["bytes"]) if "bytes" in (c or {}) else "-"

    rows = []
    for n in view.get("nodes") or []:
        name = ("this vault" + (f" ({n['url']})" if n.get("url") else "")) if n.get("self") else n.get("url")
        if n.get("up"):
            rows.append([name, "up", int(sum((n.get("requests") or {}).values())), ratio_of(n.get("hit_ratio")),
                         cache_of(n.get("cache")), (n.get("cache") or {}).get("files", "-"),
                         n.get("downloads", "-"), n.get("errors", "-")])
        else:
            rows.append([name, "DOWN", "-", "-", "-", "-", "-", "-"])
    t = view.get("total") or {}
    rows.append([f"cluster ({t.get('up', 0)} of {t.get('nodes', 0)} up)", "",
                 int(sum((t.get("requests") or {}).values())), ratio_of(t.get("hit_ratio")), cache_of(t.get("cache")),
                 (t.get("cache") or {}).get("files", "-"), t.get("downloads", 0), t.get("errors", 0)])
    out = table(rows, ["VAULT", "STATE", "REQUESTS", "HIT RATIO", "CACHE", "FILES", "DOWNLOADS", "ERRORS"],
                right=(2, 3, 4, 5, 6, 7))
    down = [f"  {n.get('url')}: {n.get('error')}" for n in view.get("nodes") or [] if not n.get("up")]
    return "\n".join(["cluster:", out] + (["", "down:"] + down if down else []))


# -- commands -------------------------------------------------------------------------


def run(args) -> int:
    if args.command == "prefetch":
        repo, _, revision = args.repo.partition("@")
        if not repo or repo.count("/") > 1 or (args.repo.endswith("@") and not revision):
            raise UsageError(f"expected ORG/REPO[@REV], got {args.repo!r}")
        body = {"backend": args.backend, "repo": repo, "revision": revision or "main",
                "repo_type": args.repo_type, "include": args.include}
        headers = {"X-Hub-Authorization": f"Bearer {args.hub_token}"} if args.hub_token else None
        answer = call(args, "POST", "prefetch", body=body, headers=headers, timeout=None)
        print(f"{repo}@{answer['commit']}: {answer['files']} files, {human_bytes(answer['bytes'])} "
              f"({answer['bytes']} bytes) in the cache")
        for failure in answer["failed"]:
            status = f" {failure['status']}" if failure.get("status") else ""
            print(f"failed:{status} {failure['path']}: {failure.get('error', '')}", file=sys.stderr)
        return 1 if answer["failed"] else 0
    if args.command == "purge":
        answer = call(args, "POST", "purge", body={"backend": args.backend, "prefix": args.prefix})
        print(f"removed {_plural(answer['removed'], 'entry', 'entries')} ({human_bytes(answer['bytes'])})")
        for skipped in answer["skipped"]:
            print(f"skipped {skipped['key']}: {skipped['reason']}")
        return 0
    if args.command == "ls":
        if args.prefix and not args.backend:
            raise UsageError("a prefix needs a backend")
        answer = call(args, "GET", "ls", query={"backend": args.backend, "prefix": args.prefix})
        print(json.dumps(answer, indent=1) if args.json else show_ls(answer))
        return 0
    if args.command == "stats":
        answer = call(args, "GET", "stats")
        print(json.dumps(answer, indent=1) if args.json else show_stats(answer))
        return 0
    raise UsageError(f"unknown command {args.command!r}")  # pragma: no cover - argparse refuses first


class UsageError(Exception):
    pass


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage line on its own errors
    try:
        return run(args)
    except UsageError as e:
        print(f"artifact-vault: error: {e}", file=sys.stderr)
        return 2
    except CallFailed as e:
        print(f"artifact-vault: {e}", file=sys.stderr)
        return 1
    except (KeyError, TypeError) as e:
        print(f"artifact-vault: unexpected answer from the vault ({type(e).__name__}: {e})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
