"""Evaluation harness: metrics, feature extractors, the COCO protocol, ``wadi eval``."""
