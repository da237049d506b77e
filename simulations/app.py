"""The transfer study's own Flower ServerApp (`fedclif simulate`): many federated runs
over subsets of the simulated sites (simulations/study.py), beside the same ClientApp a
deployment runs. A coordinator's ServerApp (server/app.py) knows nothing of it. Run
config (simulations/commands.py STUDY_RUN_CONFIG): `study` (the resolved study YAML),
`out-dir`, and the engine's `sites` and `work-root`."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from fedclif.shared.model.models import quiet_transformers
from fedclif.shared.ui import setup_logging
from fedclif.simulations.study import Study

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    quiet_transformers()
    setup_logging()
    rc = context.run_config
    Study(grid, OmegaConf.create(str(rc["study"])), str(rc["out-dir"])).run()
