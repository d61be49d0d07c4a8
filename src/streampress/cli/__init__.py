"""The ``streampress`` command line, one module per sub-command.

- :mod:`.app`: the top-level parser, dispatch and one-line errors (:func:`main`).
- :mod:`.list`, :mod:`.run`, :mod:`.bench`, :mod:`.eval`: the sub-commands, each with
  ``add_parser(subparsers, common)`` and ``main(args)``.
- :mod:`.options`: the parser class, argument types and option groups the sub-commands share.
- :mod:`.model`: the ``--model`` argument and loading it (a fast, one-line failure offline).
- :mod:`.progress`: stderr progress (formatting helpers: :mod:`streampress.formatting`).

Imports go one way: ``app`` -> sub-commands -> ``options`` / ``model`` / ``format`` /
``progress``, and into the library (``streampress.*``), which never imports this package.
``python -m streampress.eval`` is ``main(["eval", ...])``.
"""

from .app import main, parse_args

__all__ = ["main", "parse_args"]
