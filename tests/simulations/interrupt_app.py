"""A test-only ServerApp: fedclif's coordinator, whose process dies (os._exit, what a kill
leaves) right after round `die-after-round`'s checkpoint is written, so an interrupted run
is interrupted at the same point on any machine. Shipped in a test's app bundle
(tests/simulations/test_simulation.py), never in fedclif."""

import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedclif.server import run as run_module
from fedclif.server.app import main as coordinator

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    after, save = int(context.run_config["die-after-round"]), run_module.save_checkpoint

    def save_then_die(out, state, *args, **kwargs):
        save(out, state, *args, **kwargs)
        if state["round"] >= after:
            os._exit(1)

    run_module.save_checkpoint = save_then_die
    coordinator(grid, context)
