"""Datasets in their real on-disk layouts, augmentation, and the LightningDataModule."""
