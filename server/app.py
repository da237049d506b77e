"""The coordinator's Flower ServerApp: reads the run's config tree from the run config
and drives it (server/run.py). Run config (shared/protocol/flower.py RUN_CONFIG): `config` (the
resolved tree, YAML, as `fedclif run` sends it), `out-dir` (where the coordinator keeps
tokenizer, checkpoint, results), `resume`, and `audit-dir` (optional: every reply's
records are written there for inspection)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from fedclif.server.run import FederatedRun
from fedclif.shared.model.models import quiet_transformers
from fedclif.shared.protocol.federation import load_federation
from fedclif.shared.ui import setup_logging

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    quiet_transformers()
    setup_logging()
    rc = context.run_config
    text = str(rc.get("config", ""))
    config = OmegaConf.create(text) if text else load_federation()
    audit = str(rc.get("audit-dir", "")) or None
    FederatedRun(
        grid, config, str(rc["out-dir"]), resume=bool(rc.get("resume", False)), audit=audit
    ).run()
