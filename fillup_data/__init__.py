"""fillup-data: balance long-tailed image datasets with a text-to-image model (Fill-Up)."""

__version__ = "0.1.0"
