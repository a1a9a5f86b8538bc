"""``python -m hetvit``: the same as the ``hetvit`` command."""

from .cli import main

main()
