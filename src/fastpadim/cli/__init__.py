"""The ``fastpadim`` command line: a leaf over the library (nothing outside this package imports it).

``app.py`` holds the app and the list of commands; one module per command group; ``console.py`` and
``options.py`` what the commands share.
"""

from .app import COMMANDS, app, main

__all__ = ["COMMANDS", "app", "main"]
