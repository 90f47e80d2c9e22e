"""``python -m evatok_cli`` runs the ``evatok`` command."""

from evatok_cli.cli import main

main()
