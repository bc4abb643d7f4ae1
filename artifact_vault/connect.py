"""
How the vault's agents reach an upstream: the endpoints under `fetch.Upstream`.

``http://`` is a plain `HostnameEndpoint`.  ``https://`` is the same TCP
connection under Twisted's TLS protocol, with two things of our own:

* trust: the system's CAs (Twisted's browser-like policy), or for a backend
  with ``ca_file`` the CA certificates of that PEM file instead
  (`TrustPolicy`); the certificate must also name the host, as always;
* one delivery per socket read: Twisted's TLS protocol hands each decrypted
  record (16 KiB at most) up on its own, so a 1 MiB socket read became 64
  trips through the HTTP parser, the body protocol and the cache writer.
  `_BatchingTLS` marks the start and the end of each socket read, and
  `_OneDelivery`, between TLS and HTTP, hands everything decrypted from that
  read up as one piece.

When the handshake fails on the certificate, `_OneDelivery` turns the
connection's end into a `CertificateRejected` whose text says why (not
trusted, wrong name, expired), for the client's 502 and the log.
"""

import re
from datetime import datetime, timezone

from twisted.internet.endpoints import HostnameEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

#: connection creators a policy keeps (one SSL context each), per (host, port)
MAX_CREATORS = 256


class CertificateRejected(Exception):
    """An upstream's TLS certificate did not pass; the text says why (for the log and the client)."""


@implementer(IPolicyForHTTPS)
class TrustPolicy:
    """
    HTTPS for a backend with ``ca_file``: the upstream's certificate must
    chain to one of the CA certificates in that PEM file (the system's CAs do
    not count) and name the host.
    """

    def __init__(self, ca_file: str):
        from twisted.internet.ssl import Certificate, trustRootFromCertificates

        self.ca_file = ca_file
        with open(ca_file, "rb") as f:
            pem = f.read()
        blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
        certificates = [Certificate.loadPEM(block) for block in blocks]
        self._trust = trustRootFromCertificates(certificates)
        #: the same certificates, to explain a rejection
        self.certificates = [c.original.to_cryptography() for c in certificates]
        self._creators: dict = {}

    def creatorForNetloc(self, hostname: bytes, port: int):
        from twisted.internet.ssl import optionsForClientTLS

        creator = self._creators.get((hostname, port))
        if creator is None:
            if len(self._creators) >= MAX_CREATORS:
                self._creators.clear()
            creator = self._creators[(hostname, port)] = optionsForClientTLS(
                hostname.decode("ascii"), trustRoot=self._trust)
        return creator


def certificate_problem(tls, reason: Failure, host: str, trusted) -> str | None:
    """
    Why the TLS handshake with `host` failed, in words, or None when it was
    not about the certificate.  OpenSSL says only "certificate verify
    failed"; the chain the server sent is still on the connection, so look at
    it: expiry, issuer not among `trusted` (cryptography certificates; None
    for the system's CAs), self-signed.  Only the words are ours: the verdict
    is OpenSSL's and service_identity's.
    """
    from OpenSSL import SSL
    from service_identity import VerificationError

    if not reason.check(SSL.Error, VerificationError):
        return None
    try:
        chain = [c.to_cryptography() for c in (tls.getHandle().get_peer_cert_chain() or [])]
    except Exception:  # noqa: BLE001 - only a message: never a second failure
        chain = []
    leaf = chain[0] if chain else None
    name = host.rsplit(":", 1)[0]
    if reason.check(VerificationError):
        return f"the certificate is for {', '.join(_names(leaf)) or 'no host name'}, not {name}"
    if "certificate verify failed" not in str(reason.value):
        return None
    if leaf is None:
        return "certificate verify failed"
    problems = []
    now = datetime.now(timezone.utc)
    if leaf.not_valid_after_utc < now:
        problems.append(f"the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    elif leaf.not_valid_before_utc > now:
        problems.append(f"the certificate is valid only from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if not problems or (trusted is not None and not any(_issued_by(c, trusted) for c in chain)):
        why = "it is self-signed" if leaf.issuer == leaf.subject else f"issuer {leaf.issuer.rfc4514_string()}"
        problems.append(f"the certificate is not signed by a trusted CA ({why})")
    return "; ".join(problems)


def _names(certificate) -> list[str]:
    from cryptography import x509

    if certificate is None:
        return []
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName) + san.get_values_for_type(x509.IPAddress)]


def _issued_by(certificate, authorities) -> bool:
    for ca in authorities:
        if ca.subject == certificate.issuer:
            try:
                certificate.verify_directly_issued_by(ca)
                return True
            except Exception:  # noqa: BLE001 - a wrong signature, or a kind that cannot be checked here
                pass
    return False


class _OneDelivery(ProtocolWrapper):
    """
    Between TLS and HTTP.  While a socket read is being decrypted (`hold`),
    the records TLS hands up are kept; `release` passes them on as one
    piece.  At the end of the connection, a certificate failure is put in
    words (`certificate_problem`).
    """

    _held = None

    def hold(self):
        self._held = []

    def release(self):
        held, self._held = self._held, None
        if held:
            self.wrappedProtocol.dataReceived(held[0] if len(held) == 1 else b"".join(held))

    def dataReceived(self, data):
        if self._held is not None:
            self._held.append(data)
        else:
            self.wrappedProtocol.dataReceived(data)

    def connectionLost(self, reason):
        self.release()
        factory = self.factory
        problem = certificate_problem(self.transport, reason, factory.host, factory.trusted)
        if problem is not None:
            reason = Failure(CertificateRejected(
                f"TLS certificate of {factory.host} rejected: {problem} (trusted: {factory.trusted_name})"))
        ProtocolWrapper.connectionLost(self, reason)


class _OneDeliveryFactory(WrappingFactory):
    protocol = _OneDelivery
    noisy = False

    def __init__(self, wrapped, host: str, policy):
        super().__init__(wrapped)
        self.host = host
        self.trusted = getattr(policy, "certificates", None)
        ca_file = getattr(policy, "ca_file", None)
        self.trusted_name = f"the CAs of {ca_file}" if ca_file else "the system's CAs"


class _BatchingTLS(TLSMemoryBIOProtocol):
    """Twisted's TLS protocol, telling the protocol above where each socket read begins and ends."""

    def dataReceived(self, data):
        above = self.wrappedProtocol
        above.hold()
        try:
            super().dataReceived(data)
        finally:
            above.release()


class _BatchingTLSFactory(TLSMemoryBIOFactory):
    protocol = _BatchingTLS
    noisy = False


class _TLSEndpoint:
    """TCP, then TLS (`_BatchingTLS`), then `_OneDelivery`; fires with the application's protocol."""

    def __init__(self, tcp, creator, host: str, policy):
        self._tcp = tcp
        self._creator = creator
        self._host = host
        self._policy = policy

    def connect(self, factory):
        above = _OneDeliveryFactory(factory, self._host, self._policy)
        tls = _BatchingTLSFactory(self._creator, True, above)
        return self._tcp.connect(tls).addCallback(lambda protocol: protocol.wrappedProtocol.wrappedProtocol)


@implementer(IAgentEndpointFactory)
class Endpoints:
    """The endpoint of each origin for an `Agent`: TCP for http://, TCP + TLS for https://."""

    def __init__(self, reactor, policy=None, connect_timeout: float = 30):
        self._reactor = reactor
        self._policy = policy if policy is not None else BrowserLikePolicyForHTTPS()
        self._timeout = connect_timeout

    def endpointForURI(self, uri):
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"the host {uri.host!r} is not ASCII") from None
        tcp = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"http":
            return tcp
        if uri.scheme == b"https":
            creator = self._policy.creatorForNetloc(uri.host, uri.port)
            return _TLSEndpoint(tcp, creator, f"{host}:{uri.port}", self._policy)
        raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
