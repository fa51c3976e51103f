"""An example prunekit plugin: the ``key_norm`` criterion, the ``geometric_mean`` combiner, one recipe."""
