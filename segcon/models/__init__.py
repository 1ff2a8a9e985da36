"""The network: SegNet (an smp model + train-only heads) and its SegOutput contract."""
