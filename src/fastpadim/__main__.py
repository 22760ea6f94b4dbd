"""``python -m fastpadim``: the same as the ``fastpadim`` command."""

from .cli import main

main()
