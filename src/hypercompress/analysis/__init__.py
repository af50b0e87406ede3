"""Analysis: rate-distortion curves of compression runs."""
