"""Networks: the model contract (base.py), the training output (output.py, no model library
imported), SegNet on smp (segnet.py) and train-only heads (heads.py)."""
