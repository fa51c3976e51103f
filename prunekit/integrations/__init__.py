"""Bridges to evaluation frameworks (optional extras): :mod:`prunekit.integrations.lmms_eval`."""
