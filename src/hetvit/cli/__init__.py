"""The ``hetvit`` command: one subcommand per verb.

:mod:`hetvit.cli.app` holds the app and how it reports errors, :mod:`hetvit.cli.common` what
the commands share; the commands live beside them by theme: ``models`` (plan, compress, bench),
``deploy`` (export), ``training`` (train, finetune, evaluate), ``analysis`` (analyze, demo) and
``fit``. Importing them registers their commands with the app, in this order.
"""

from . import models, deploy, training, analysis, fit  # noqa: F401, I001  (registers, in this order)
from .app import app, main

__all__ = ["app", "main"]
