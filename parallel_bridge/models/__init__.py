"""Models defined once for training and serving."""
