"""``python -m fastpadim.cli``: the same as the ``fastpadim`` command."""

from .app import main

main()
