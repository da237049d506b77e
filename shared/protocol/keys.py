"""Key files: private keys written with mode 0600 from the moment they exist (never
world-readable, not even between a write and a chmod), and a site's authentication key
pair (EC P-384 in OpenSSH format, what Flower's SuperNode authentication reads)."""

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedclif.shared.errors import FedclifError

SITE_KEY, SITE_PUB = "site.key", "site.pub"


def write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 and write `data`; an existing file is never replaced."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as e:
        raise FedclifError(f"{path} already exists: a key is never overwritten") from e
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_site_keys(out: str | Path) -> tuple[Path, Path]:
    """A new key pair in `out`: site.key (private, 0600: it stays at the site) and
    site.pub (what the coordinator registers)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / SITE_KEY, out / SITE_PUB
    write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public
