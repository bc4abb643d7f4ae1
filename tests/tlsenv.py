"""
TLS for the test rigs and the benchmark: certificates made on the spot, and
the fake upstream behind TLS.

`make_certs(folder, names)` writes ``ca.pem`` (a new CA), ``cert.pem`` (a
server certificate for `names`, signed by that CA, optionally expired) and
``key.pem`` (its key) and returns their paths.  `listen_tls(upstream,
certs)` puts a `tests.upstream.FakeUpstream` on a TLS port of 127.0.0.1 and
sets its URL to ``https://localhost:PORT`` (the name the certificate has).
"""

import datetime
import ipaddress
import os


def make_certs(folder: str, names=("localhost", "127.0.0.1"), expired: bool = False,
               ca_name: str = "vault test CA") -> dict:
    """A CA and a server certificate for `names` signed by it, as PEM files; returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (x509.CertificateBuilder()
          .subject_name(issuer).issuer_name(issuer)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - day).not_valid_after(now + 30 * day)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt = [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in names]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - (30 * day if expired else day))
            .not_valid_after(now - day if expired else now + 30 * day)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(ca_key, hashes.SHA256()))
    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, f"{name}.pem") for name in ("ca", "cert", "key")}
    with open(paths["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


def listen_tls(upstream, certs: dict, reactor=None, host: str = "localhost"):
    """Serve `upstream` (a FakeUpstream) over TLS with `certs`; its URL becomes https://HOST:PORT."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from twisted.internet import ssl

    if reactor is None:
        from twisted.internet import reactor
    with open(certs["key"], "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    with open(certs["cert"], "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    options = ssl.CertificateOptions(privateKey=key, certificate=cert)
    port = reactor.listenSSL(0, upstream._site, options, interface="127.0.0.1")
    upstream._ports.append(port)
    upstream.url = f"https://{host}:{port.getHost().port}"
    return port
