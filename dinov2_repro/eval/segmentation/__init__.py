"""Frozen-backbone semantic segmentation: data, necks, decoders, metrics, training, map prediction."""
