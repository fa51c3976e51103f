"""The next toy, laid out like LLaVA-1.5 (image first, 144 visual tokens, small objects, an oracle's ground truth).

Its task, model and resumable training are here; its weights are not trained yet (training on two CPU
cores plateaus below the bars docs/toy.md sets). Until they are, ``prunekit run`` and ``prunekit eval`` use
the first toy by default; ``--toy llava`` (with ``--weights FOLDER`` for eval) picks this one. Train it with
``python -m prunekit.toy.v2.train --out prunekit/toy/v2/weights``.
"""
