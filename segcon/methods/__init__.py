"""LightningModules (one per training method), optimizers, callbacks."""
