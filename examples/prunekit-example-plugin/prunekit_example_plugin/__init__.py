"""An example prunekit plugin: the ``mlp_output_norm`` criterion, the ``geometric_mean`` combiner, one recipe."""
