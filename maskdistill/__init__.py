"""MaskDistill: unsupervised semantic segmentation by distilling object masks from a ViT."""

__version__ = "0.1.0"
