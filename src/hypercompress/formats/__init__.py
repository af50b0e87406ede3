"""On-disk encodings, kept apart from the algorithms that produce them."""
