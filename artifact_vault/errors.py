"""
What can go wrong on the way to an answer, as exceptions that know their
HTTP status.  Every failure of a request flows through its Deferred to
`artifact_vault.site.respond_error`, the one place that turns them into a
response; anything that is not a `VaultError` there is a bug and answers 500.
"""


class VaultError(Exception):
    status = 500

    def __init__(self, message: str, status: int | None = None, headers=None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        #: extra response headers, as {name: value}
        self.headers = dict(headers or {})


class BadRequest(VaultError):
    status = 400


class NotFound(VaultError):
    status = 404


class MethodNotAllowed(VaultError):
    status = 405

    def __init__(self, message: str, allowed=("GET", "HEAD")):
        super().__init__(message, headers={"Allow": ", ".join(allowed)})


class UpstreamStatus(VaultError):
    """Upstream answered with an error status; 4xx pass through, 5xx become 502."""

    def __init__(self, code: int, url: str, headers=None):
        status = code if 400 <= code < 500 else 502
        super().__init__(f"upstream {safe_url(url)} answered {code}", status, headers)
        self.code = code
        self.url = url


class UpstreamUnavailable(VaultError):
    """Refused, unreachable, reset or redirect trouble: 502."""

    status = 502


class UpstreamTimeout(VaultError):
    status = 504


class IntegrityError(VaultError):
    """The bytes upstream sent are not the ones it announced: 502, nothing cached."""

    status = 502


class NotAFile(VaultError):
    """Upstream redirected a file's URL to a folder (a URL ending in '/'): nothing is kept under the file's name."""

    status = 404


class StorageFull(VaultError):
    status = 507


def safe_url(url) -> str:
    """A URL fit for logs and error bodies: no user info, no query (signatures)."""
    from urllib.parse import urlsplit, urlunsplit

    if isinstance(url, bytes):
        url = url.decode("ascii", "replace")
    try:
        p = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = p.hostname or ""
    try:
        if p.port:
            netloc = f"{netloc}:{p.port}"
    except ValueError:
        netloc += ":<bad port>"
    query = "?…" if p.query else ""
    return urlunsplit((p.scheme, netloc, p.path, "", "")) + query
