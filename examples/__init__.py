"""Stand-alone examples. A package, so that ``py:examples.outside_cnn:build`` imports from the repository root."""
