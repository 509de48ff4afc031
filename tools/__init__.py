"""Developer tools run from a checkout (``python -m tools.<name>`` at the repository root); not
part of the installed package."""
