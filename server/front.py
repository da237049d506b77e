"""The coordinator's public door: the only listener strangers on the network reach. It
answers the Fleet API calls a SuperNode makes (an allow-list of paths, methods, media type
and headers) and forwards them to the SuperLink, which listens on loopback only; every
other request (the Control API: `flwr run`, `ls`, `stop`, key registration; the Runtime
API: tasks and their tokens; the docs) gets 404 here and never reaches Flower.

Why a front at all: Flower 1.41 serves Fleet, Control and Runtime on one port, and only
Fleet calls are authenticated (by the sites' registered keys). Why this one, in Python:
its one job is to forward a fixed list of unary protobuf POSTs, and it runs on uvicorn and
httpx, the server and client Flower itself uses, so a coordinator needs no system package
(nginx, Caddy) beside `pip install fedclif`, and CI tests the real thing."""

import logging
import ssl
from pathlib import Path

import httpx
import uvicorn
from flwr.common.constant import TIMESTAMP_HEADER
from flwr.supercore.constant import (
    FLEET_HTTP_PUBLIC_KEY_HEADER,
    FLEET_HTTP_SIGNATURE_HEADER,
    FLWR_COMPONENT_NAME_METADATA_KEY,
    FLWR_PACKAGE_NAME_METADATA_KEY,
    FLWR_PACKAGE_VERSION_METADATA_KEY,
    VERSION_INCOMPATIBILITY_MESSAGE_METADATA_KEY,
)
from flwr.supercore.grpc import GRPC_MAX_MESSAGE_LENGTH
from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE

log = logging.getLogger(__name__)

# What a SuperNode calls (flwr/supernode/fleet_http_client.py). A path Flower adds is
# refused until someone decides it is safe for strangers to reach.
FLEET_PATHS = frozenset(
    f"/v1/fleet/{call}"
    for call in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
# Headers passed through: the media type, the node's signed identity and Flower's version.
REQUEST_HEADERS = (
    "content-type",
    "accept",
    FLEET_HTTP_PUBLIC_KEY_HEADER,
    FLEET_HTTP_SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    FLWR_PACKAGE_NAME_METADATA_KEY,
    FLWR_PACKAGE_VERSION_METADATA_KEY,
    FLWR_COMPONENT_NAME_METADATA_KEY,
)
RESPONSE_HEADERS = ("content-type", VERSION_INCOMPATIBILITY_MESSAGE_METADATA_KEY)
# A body larger than Flower's own message limit is refused before it is read whole.
MAX_BODY = GRPC_MAX_MESSAGE_LENGTH


def refusal(method: str, path: str, content_type: str) -> str | None:
    """Why the front refuses a request, or None: only the Fleet calls, as POSTs of
    protobuf, pass."""
    if path not in FLEET_PATHS:
        return "not a Fleet API path"
    if method != "POST":
        return f"method {method}"
    if content_type.split(";")[0].strip().lower() != PROTOBUF_MEDIA_TYPE:
        return "not a protobuf body"
    return None


class Front:
    """An ASGI app forwarding the allowed Fleet calls to `upstream` (the SuperLink on
    loopback, TLS checked against `ca`)."""

    def __init__(self, upstream: str, ca: Path):
        self.upstream = f"https://{upstream}"
        self.verify = ssl.create_default_context(cafile=str(ca))
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan and websockets: nothing to serve
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        why = refusal(scope["method"], scope["path"], headers.get("content-type", ""))
        if why is None and int(headers.get("content-length", 0) or 0) > MAX_BODY:
            why = "body over Flower's message limit"
        if why:
            client = scope.get("client") or ("?", 0)
            log.warning(
                "front: refused %s %s from %s (%s)", scope["method"], scope["path"], client[0], why
            )
            await _respond(send, 404, b"not found", {"content-type": "text/plain"})
            return
        body = bytearray()
        while True:
            event = await receive()
            body += event.get("body", b"")
            if len(body) > MAX_BODY:
                await _respond(send, 413, b"too large", {"content-type": "text/plain"})
                return
            if not event.get("more_body"):
                break
        if self.client is None:  # made in the server's event loop
            self.client = httpx.AsyncClient(verify=self.verify, timeout=60.0)
        forwarded = {k: headers[k] for k in REQUEST_HEADERS if k in headers}
        try:
            r = await self.client.post(
                self.upstream + scope["path"], content=bytes(body), headers=forwarded
            )
        except httpx.HTTPError as e:
            log.error("front: the SuperLink did not answer %s: %s", scope["path"], e)
            await _respond(send, 502, b"bad gateway", {"content-type": "text/plain"})
            return
        kept = {k: r.headers[k] for k in RESPONSE_HEADERS if k in r.headers}
        await _respond(send, r.status_code, r.content, kept)


async def _respond(send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def serve_front(host: str, port: int, upstream: str, pki: Path) -> None:
    """Serve the front on host:port with the coordinator's TLS certificate until a
    signal stops it."""
    log.info("front: serving the Fleet API on %s:%d for the SuperLink at %s", host, port, upstream)
    uvicorn.run(
        Front(upstream, pki / "ca.crt"),
        host=host,
        port=port,
        ssl_certfile=str(pki / "server.crt"),
        ssl_keyfile=str(pki / "server.key"),
        lifespan="off",
        access_log=False,
        server_header=False,
        date_header=False,
    )
