"""
Generic HTTP mirror: ``GET /prefix/a/b.tar.gz`` is ``base_url/a/b.tar.gz``.

Policy: upstream files are immutable, so a cached file is served without
asking upstream again.  What cannot be a file is forwarded without caching:
a path ending in ``/`` (a directory listing) and any request with a query
string.  A HEAD for a file not in the cache is forwarded upstream as a HEAD
(it does not start a download).
"""

from urllib.parse import quote

from ..errors import BadRequest, NotAFile, VaultError
from ..store import UnsafePath, safe_segments
from .base import Backend


class HttpBackend(Backend):
    def handle(self, request, subpath: bytes):
        self.check_method(request)
        folder = subpath == b"" or subpath.endswith(b"/")
        try:
            segments = safe_segments(subpath.rstrip(b"/")) if subpath.strip(b"/") else []
        except UnsafePath as e:
            raise BadRequest(f"bad path: {e}") from None
        url_path = "/".join(quote(s, safe="") for s in segments)
        url = f"{self.config.base_url}/{url_path}" + ("/" if folder and segments else "")
        query = request.uri.partition(b"?")[2]
        if folder or query:
            if query:
                url += "?" + query.decode("ascii", "replace")
            return self.relay(request, request.method.decode(), url)
        key = f"{self.name}/" + "/".join(segments)
        if request.method == b"HEAD" and self.store.lookup(key) is None and self.downloads.get(key) is None:
            return self.relay(request, "HEAD", url, relayed=_HEAD_HEADERS)
        d = self.serve_cached(request, self.download_spec(key, url))
        return d.addErrback(self._folder, request)

    @staticmethod
    def _folder(failure, request):
        """A folder asked for without its slash: send the client where upstream sent us, as a web server does."""
        failure.trap(NotAFile)
        raise VaultError("this is a folder", 301, {"Location": request.path.decode("ascii") + "/"})


_HEAD_HEADERS = ("content-type", "etag", "last-modified", "accept-ranges")
