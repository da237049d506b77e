"""fedclif: federated training of EHR foundation models on CLIF ICU data.

The repository's folders are the package's floors: `fedclif.shared` (the ground: data,
tokenizer, models, metrics, config, the federation protocol), `fedclif.client` (what a
hospital runs) and `fedclif.server` (what a coordinator runs) side by side, never
importing each other, `fedclif.simulations` above them, and `fedclif.cli` the roof.
"""
