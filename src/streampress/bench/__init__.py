"""Speed and memory measurements kept apart from the core.

- :mod:`streampress.bench.report`: ratios to dense, terminal table, Markdown, JSON and plot
  from a plain result dict (no model needed).
- :mod:`streampress.bench.runner`: runs the dense baseline and each method on the same frames
  in one process and collects the result dict.
- :mod:`streampress.bench.synthetic`: the built-in synthetic video (no downloads).
"""
