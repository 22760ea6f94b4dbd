"""Registers the commands that live beside their subject (demo, evaluate, serve) on the ``fastpadim`` app."""

from . import demo  # noqa: F401
from . import evaluate  # noqa: F401
from . import serve  # noqa: F401
from . import export  # noqa: F401
