"""The recipes: bash drivers (lm.sh, translation.sh) and the Python they call, importable as
``recipes.*`` from the repository root (``python3 -m recipes.variants --help``)."""
