"""``python -m llamawrapper.cli``."""

from . import main

main()
