"""The ``hetvit`` command: one subcommand per verb.

:mod:`hetvit.cli.common` holds the app and what the commands share; the commands live beside
it by theme: ``models`` (plan, compress, bench), ``deploy`` (export), ``training`` (train, finetune,
evaluate), ``analysis`` (analyze, demo) and ``fit``. Importing them registers their commands
with the app, in this order.
"""

from . import models, deploy, training, analysis, fit  # noqa: F401, I001  (registers, in this order)
from .common import app, main

__all__ = ["app", "main"]
