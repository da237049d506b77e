"""A test-only ClientApp: fedclif's own at every site but one. The virtual node whose
`partition-id` is the run config's `rogue-node` poisons its statistics (a negative count)
and, in training round r, sends the r-th kind of bad reply of `rogue-kinds`. Shipped in
a test's app bundle (tests/simulations/test_simulation.py), never in fedclif."""

import json

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedclif.client.app import app as honest

app = ClientApp()


def _rogue(context: Context) -> bool:
    return int(context.node_config.get("partition-id", -1)) == int(context.run_config["rogue-node"])


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    return honest(msg, context)


@app.query("tokenize")
def tokenize(msg: Message, context: Context) -> Message:
    return honest(msg, context)


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    reply = honest(msg, context)
    if _rogue(context) and not reply.has_error():
        s = json.loads(str(reply.content["stats"]["json"]))
        s["codes"][next(iter(s["codes"]))] = -5
        reply.content["stats"]["json"] = json.dumps(s)
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest(msg, context)
    if not _rogue(context) or reply.has_error():
        return reply
    kinds = str(context.run_config["rogue-kinds"]).split(",")
    kind = kinds[(int(msg.content["config"]["round"]) - 1) % len(kinds)]
    arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    if kind == "no-arrays":
        del reply.content["arrays"]
    elif kind in ("float64", "nan"):
        bad = {
            k: v.astype(np.float64) if kind == "float64" else np.full_like(v, np.nan)
            for k, v in arrays.items()
        }
        reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in bad.items()})
    elif kind == "huge-examples":
        reply.content["metrics"]["num-examples"] = 10**9
    return reply
