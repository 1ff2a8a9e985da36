"""segcon: semantic segmentation with contrastive objectives and teacher-student learning."""

import os

# albumentations asks the package registry for its newest version on every import; that is a
# network call (and a delay) on every run and in every data-loader worker.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
