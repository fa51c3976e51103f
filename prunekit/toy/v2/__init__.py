"""The next toy, laid out like LLaVA-1.5 (image first, 144 visual tokens, small objects, an oracle's ground truth).

Its task, model and resumable training are here; its weights are not trained yet (the training on two
CPU cores had not left its plateau when this package was written: docs/toy.md). Until they are,
``prunekit run`` and ``prunekit eval`` use the first toy (``prunekit.toy.task``, ``prunekit.toy.model``).
Train it with ``python -m prunekit.toy.v2.train --out prunekit/toy/v2/weights``; evaluate it with
``run_eval(*load_toy(folder), recipes, task=prunekit.toy.v2.task)``.
"""
