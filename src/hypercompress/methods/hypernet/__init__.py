"""The Solomonoff hypernetwork: a model stored as a small network that generates its weights."""
