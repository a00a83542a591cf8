"""Tiny cloud-image-like demo guest (boots in seconds under TCG) for virtfleet."""
