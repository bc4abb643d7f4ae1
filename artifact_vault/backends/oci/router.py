"""
``/v2/`` at the root of the vault, where docker's ``registry-mirrors``,
containerd's hosts.toml and podman's registries.conf send their requests
(they cannot put a path before ``/v2/``).  `OciRouter` is a root router
(`site.VaultRoot`): it takes every ``/v2`` path and hands it to the front
resource, which picks the upstream:

1. ``?ns=<registry>`` (containerd names the registry the image is from);
2. a first path segment equal to a backend's ``registry``
   (``/v2/ghcr.io/org/img/manifests/1.0``, for clients without a mirror
   setting: ``skopeo copy docker://vault:8080/ghcr.io/org/img:1.0``);
3. the backend with ``default: true``.

``GET /v2/`` answers ``{}`` for all of them.  With ``access_tokens``, a
client without a token gets 401 with a Basic challenge (docker, containerd
and podman send credentials only after one), and the token is taken as the
password of any user.
"""

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ...site import CONTENT_HEADERS, ErrorPage, answer
from .backend import base_endpoint
from .protocol import API_VERSION, RegistryError, error_page


class OciRouter:
    def __init__(self, backends):
        self.backends = list(backends)
        self.by_registry = {b.registry: b for b in self.backends}
        self.default = next((b for b in self.backends if b.default), None)
        self.front = OciFront(self)

    def route(self, request):
        if getattr(request, "proxy_target", None) is not None:
            return None  # the vault as an HTTP proxy serves the upstreams backends name (site.ProxyRouter)
        path = request.path
        if path == b"/v2" or path.startswith(b"/v2/"):
            return self.front
        return None

    def pick(self, request, rest: bytes):
        """(backend, path below the registry, the base of this client's links, extra query of its links)."""
        ns = request.args.get(b"ns")
        if ns:
            registry = ns[0].decode("ascii", "replace").strip().lower()
            backend = self.by_registry.get(registry)
            if backend is None:
                raise RegistryError("NAME_UNKNOWN", f"the vault serves no registry {registry[:100]!r} "
                                                    f"(it serves {', '.join(sorted(self.by_registry))})", 404)
            return backend, rest, "/v2/", "ns=" + backend.registry
        first, slash, below = rest.partition(b"/")
        backend = self.by_registry.get(first.decode("ascii", "replace").lower()) if slash else None
        if backend is not None:
            return backend, below, f"/v2/{backend.registry}/", ""
        if self.default is not None:
            return self.default, rest, "/v2/", ""
        raise RegistryError("NAME_UNKNOWN", "the name starts with no registry the vault serves "
                                            f"({', '.join(sorted(self.by_registry))}) and no oci backend is "
                                            "the default", 404)


def _prepare(request) -> None:
    request.setHeader(*API_VERSION)
    for name, value in CONTENT_HEADERS:
        request.setHeader(name, value)
    request.error_page = error_page


class OciFront(Resource):
    isLeaf = True

    def __init__(self, router: OciRouter):
        super().__init__()
        self.router = router

    def unauthorized(self, request):
        """The 401 for a client without the vault's token: a Basic challenge, in the registry's form."""
        _prepare(request)
        return ErrorPage(RegistryError(
            "UNAUTHORIZED", "this vault needs an access token: log in with any user name and the token as password",
            401, {"WWW-Authenticate": 'Basic realm="artifact-vault"'}), "unauthenticated registry request")

    def render(self, request):
        _prepare(request)
        rest = request.path[len(b"/v2/"):]
        what = f"{request.method.decode('ascii', 'replace')} {request.path.decode('ascii', 'replace')[:300]}"
        if not rest:
            return answer(request, lambda: base_endpoint(request), what)
        try:
            backend, below, base, query = self.router.pick(request, rest)
        except RegistryError as e:
            return ErrorPage(e, what).render(request)
        request.oci_base = base
        request.oci_query = query
        request.subpath = below  # what the backend's handle() gets, instead of the path below its prefix
        result = backend._dispatch(request)
        return NOT_DONE_YET if result is None else result
