"""``python -m trainlint`` is the ``trainlint`` command."""

from .cli import main

main()
