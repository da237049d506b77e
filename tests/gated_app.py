"""A test-only ServerApp: fedclif's coordinator, which after round `pause-after-round`'s
checkpoint writes `<out-dir>/paused` and waits for `<out-dir>/go`, so a test can act
between two rounds (stop a site) at the same point on any machine. Shipped in a test's
app bundle (tests/test_federation.py), never in fedclif."""

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedclif.server import run as run_module
from fedclif.server.app import main as coordinator

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    after, save = int(context.run_config["pause-after-round"]), run_module.save_checkpoint
    out = Path(str(context.run_config["out-dir"]))

    def save_then_wait(where, state, *args, **kwargs):
        save(where, state, *args, **kwargs)
        if state["round"] == after:
            (out / "paused").touch()
            end = time.monotonic() + 600
            while not (out / "go").exists() and time.monotonic() < end:
                time.sleep(0.2)

    run_module.save_checkpoint = save_then_wait
    coordinator(grid, context)
