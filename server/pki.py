"""A development PKI for a federation: a CA and the SuperLink's TLS certificate. Sites
make their own authentication keys (`fedclif site keygen`); only for local tests does
`dev_site_keys` make them here. Hospitals with a real PKI use their own CA-signed server
certificate instead (README: "For coordinators")."""

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.keys import write_private, write_site_keys

DAYS = 365


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    if private:
        write_private(path, data)
    else:
        path.write_bytes(data)


def _cert(subject, issuer, public_key, signer, ca: bool, sans=None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(signer, hashes.SHA256())


def init_pki(out: str | Path, hosts: list[str], dev_site_keys: list[str] = ()) -> dict[str, Path]:
    """Write ca.crt/ca.key and server.crt/server.key (valid for `hosts`); refuses to
    overwrite an existing PKI. `dev_site_keys` (local tests only: a coordinator holding a
    site's private key can impersonate it) also writes sites/<name>/{site.key, site.pub,
    ca.crt}."""
    out = Path(out)
    if (out / "ca.key").exists():
        raise FedclifError(f"{out} already holds a CA: use another --out or remove it first")
    sites = list(dev_site_keys)
    bad = [s for s in sites if not s or not s.replace("-", "").replace("_", "").isalnum()]
    if bad or len(set(sites)) != len(sites):
        raise FedclifError(f"site names must be unique letters, digits, - or _; got {sites}")
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _cert(
        _name("fedclif development CA"),
        _name("fedclif development CA"),
        ca_key.public_key(),
        ca_key,
        ca=True,
    )
    srv_key = ec.generate_private_key(ec.SECP384R1())
    sans = []
    # 127.0.0.1 always: the front (server/front.py) reaches the SuperLink on loopback.
    for h in dict.fromkeys([*hosts, "127.0.0.1"]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    srv = _cert(_name(hosts[0]), ca.subject, srv_key.public_key(), ca_key, ca=False, sans=sans)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    _write(out / "ca.crt", ca_pem)
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "server.crt", srv.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(srv_key), private=True)
    paths = {}
    for s in sites:
        d = out / "sites" / s
        write_site_keys(d)
        _write(d / "ca.crt", ca_pem)
        paths[s] = d
    return paths
