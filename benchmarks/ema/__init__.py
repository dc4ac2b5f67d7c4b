"""The parts of ``benchmarks/bench_ema.py``, one concern per module.

``settings`` (learning rate, decays, row names), ``trees`` (the
transformer-like parameter trees and their sizes), ``runner`` (a row and
what it runs), ``xla`` (what a compiled step says: memory, loops),
``optax_rows`` (optax, optax_ema, the hand-written EMAs and the floor),
``peer_rows`` (Flax NNX and Keras), ``rows`` (the table's rows, in order),
``check`` (every row against the test suite's NumPy EMA), ``timing``,
``memory`` (peak RSS in a fresh process per row), ``report`` (the targets,
the text and Markdown tables) and ``cli`` (the command line). The package is
imported as ``ema`` with ``benchmarks/`` on the path, as the entry point
``bench_ema.py`` does.
"""
