"""Measurements of evlp's own speed, one module per ``evlp bench`` command: :mod:`evlp.bench.train`,
:mod:`evlp.bench.data` and :mod:`evlp.bench.eval`; :mod:`evlp.bench.rates` holds the reference rates and FLOP counts."""
