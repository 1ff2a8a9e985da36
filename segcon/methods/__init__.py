"""The training methods: one LightningModule per method, each a step on top of SupervisedModule."""
