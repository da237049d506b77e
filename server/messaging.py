"""The server's side of the conversation with the sites, for a federated run and for the
study's ServerApp alike: which nodes are the run's and what each is called, sending
messages and collecting (or streaming) the replies, failures named by site, and an audit
of every reply."""

import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.federation import ERRORS, FLOWER_ERRORS, from_record

log = logging.getLogger(__name__)


def stream_replies(
    grid: Grid, msgs: list[Message], timeout: float, poll_s: float, one_at_a_time: bool
) -> Iterator[Message]:
    """Push `msgs` now (not at the first `next`), then yield the replies as they arrive
    until all came or `timeout` seconds passed. `one_at_a_time`: each reply is pulled
    alone, so that no more than one is held here (a round's updates: the server's memory
    stays flat in the number of sites); else every waiting reply is pulled at once."""
    waiting = set(grid.push_messages(msgs))

    def replies() -> Iterator[Message]:
        end = time.monotonic() + timeout
        while waiting and time.monotonic() < end:
            for ids in [[mid] for mid in list(waiting)] if one_at_a_time else [list(waiting)]:
                for r in grid.pull_messages(ids):
                    waiting.discard(r.metadata.reply_to_message_id)
                    yield r
            if waiting:
                time.sleep(poll_s)

    return replies()


class Messenger:
    """The sites of one run as the server reaches them through a Flower Grid. `sites`
    (node id -> name) is known up front in a study (its virtual nodes), else learned from
    the sites' answers (`claim`). `audit`: a directory where every reply's records are
    written, to inspect what left the sites."""

    def __init__(
        self,
        grid: Grid,
        timeout: float,
        min_sites: int,
        audit: str | Path | None = None,
        sites: dict[int, str] | None = None,
    ):
        self.grid, self.timeout, self.min_sites = grid, float(timeout), int(min_sites)
        self.sites: dict[int, str] = dict(sites or {})
        # Nodes left out of the run (a second node under a site's name), and why.
        self.excluded: dict[int, str] = {}
        self._names: dict[int, str] = {}  # registered names, by node id (`_registered`)
        self.audit = Path(audit) if audit else None
        self._n_audit = 0

    def nodes(self) -> list[int]:
        """Connected nodes, waiting (up to the timeout) until `min_sites` are there."""
        t0 = time.monotonic()
        while True:
            nodes = sorted(n for n in self.grid.get_node_ids() if n not in self.excluded)
            if len(nodes) >= self.min_sites:
                return nodes
            if time.monotonic() - t0 > self.timeout:
                raise FedclifError(
                    f"only {len(nodes)} site(s) connected after {self.timeout:.0f} s; "
                    f"the run needs min_sites={self.min_sites}"
                )
            time.sleep(1.0)

    def site(self, node: int) -> str:
        return self.sites.get(node, f"node-{node}")

    def _registered(self, node: int) -> dict[int, str]:
        """Node id -> the name it was registered under at the SuperLink (`fedclif site
        register`; none in a simulation), asked again when `node` is not in it yet."""
        if node not in self._names:
            self._names = {n.node_id: n.name for n in self.grid.get_nodes() if n.name}
        return self._names

    def claim(self, node: int, claimed: str) -> str | None:
        """Name `node`; returns why it is left out of the run, or None. A registered node
        is named by its registration, bound to its key, whatever it answers; an
        unregistered one (a simulation's) by its answer, unless another node holds that
        name, registered or connected: the node is then left out of the run, whoever came
        first (two sites under one name would overwrite each other's records). A site back
        under a new node id (a resumed simulation) takes its name back."""
        registered = self._registered(node)
        if node in registered:
            name = registered[node]
            if claimed != name:
                log.info("node %d answers as %r; it is registered as %r", node, claimed, name)
            holders = []
        else:
            name = claimed
            holders = [n for n, v in self.sites.items() if n != node and v == name]
            live = set(self.grid.get_node_ids()) if holders else set()
            if name in registered.values() or any(n in live for n in holders):
                self.excluded[node] = why = f"duplicate site name {name!r}"
                log.warning("node %d left out of the run: %s", node, why)
                return why
        for n in holders:
            del self.sites[n]
        self.sites[node] = name
        return None

    def remember(self, sites: dict[int, str]) -> None:
        """Names an earlier part of the run learned (a resumed run's checkpoint)."""
        self.sites.update(sites)

    def included(self, msgs: Iterable[Message]) -> list[Message]:
        """`msgs` without those to nodes left out of the run."""
        return [m for m in msgs if m.metadata.dst_node_id not in self.excluded]

    def messages(self, kind: str, content: RecordDict) -> list[Message]:
        """One message of type `kind` with `content` to every site."""
        return [
            Message(content=content.copy(), dst_node_id=n, message_type=kind) for n in self.nodes()
        ]

    def send(self, msgs: list[Message]) -> list[Message]:
        """Send `msgs` and wait (up to the timeout) for the replies."""
        return list(self.grid.send_and_receive(msgs, timeout=self.timeout))

    def stream(self, msgs: list[Message], poll_s: float = 2.0) -> Iterator[Message]:
        """Send `msgs`; the replies one at a time as they arrive (up to the timeout)."""
        return stream_replies(self.grid, msgs, self.timeout, poll_s, one_at_a_time=True)

    def sort(
        self, msgs: list[Message], replies: Iterable[Message], what: str
    ) -> tuple[list[Message], list[dict]]:
        """The replies with content, and failures as (site, category), silent sites
        included, each logged by name."""
        failed: list[dict] = []
        return list(self.replies(msgs, replies, what, failed)), failed

    def replies(
        self, msgs: list[Message], replies: Iterable[Message], what: str, failed: list[dict]
    ) -> Iterator[Message]:
        """The replies with content, as they come; failures go to `failed` (the silent
        sites' once the replies end), each logged by name."""
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        answered, n_failed = set(), len(failed)
        for r in replies:
            self._audit(r, what)
            # Error replies the SuperLink makes for a lost site come from the SuperLink:
            # name the site the message was for.
            node = dst.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            answered.add(node)
            if r.has_error():
                code = r.error.code
                name = ERRORS.get(code) or FLOWER_ERRORS.get(code, "internal")
                failure = {"site": self.site(node), "error": name}
                if name == "policy":  # the site names the rule its policy applied
                    failure["reason"] = str(r.error.reason)
                failed.append(failure)
            else:
                yield r
        failed += [
            {"site": self.site(m.metadata.dst_node_id), "error": "no_reply"}
            for m in msgs
            if m.metadata.dst_node_id not in answered
        ]
        for f in failed[n_failed:]:
            log.warning("%s: site %s failed (%s)", what, f["site"], f.get("reason", f["error"]))

    def _audit(self, reply: Message, what: str) -> None:
        if self.audit is None:
            return
        self.audit.mkdir(parents=True, exist_ok=True)
        self._n_audit += 1
        base = self.audit / f"{self._n_audit:04d}-{what.replace(' ', '_')}"
        records = {}
        if not reply.has_error():
            c = reply.content
            records = {
                "config": {k: dict(v) for k, v in c.config_records.items()},
                "metrics": {k: dict(v) for k, v in c.metric_records.items()},
                "arrays": {k: sorted(v.keys()) for k, v in c.array_records.items()},
            }
            for k, rec in c.array_records.items():
                np.savez(f"{base}-{k}.npz", **from_record(rec))
        error = (
            {"code": reply.error.code, "reason": reply.error.reason} if reply.has_error() else None
        )
        Path(f"{base}.json").write_text(json.dumps({"records": records, "error": error}))
