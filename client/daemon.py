"""The site daemon's process: `flower-supernode` for one site, with TLS to the
coordinator's SuperLink, the site's authentication key and its data in the node config."""

from pathlib import Path

from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.flower import executable


def supernode_command(
    data: Path,
    superlink: str,
    ca: Path,
    key: Path,
    name: str,
    policy: Path,
    port: int,
) -> list[str]:
    """`flower-supernode` for one site: TLS to the SuperLink, its authentication key, and
    the site's data and policy paths in its node config."""
    for f, what in ((data, "CLIF directory"), (ca, "CA certificate"), (key, "site key")):
        if not f.exists():
            raise FedclifError(f"{what} {f} not found")
    cfg = {
        "data-path": str(data.resolve()),
        "site-name": name,
        "policy-path": str(policy.resolve()),
    }
    node_config = " ".join(
        f"{k}={v}" if isinstance(v, float) else f'{k}="{v}"' for k, v in cfg.items()
    )
    return [
        executable("flower-supernode"),
        "--root-certificates",
        str(ca),
        "--superlink",
        superlink,
        "--auth-supernode-private-key",
        str(key),
        "--node-config",
        node_config,
        "--port",
        str(port),
    ]
