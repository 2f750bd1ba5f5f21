"""``python -m promptcache.testing``: see :mod:`promptcache.testing.cli`."""

from promptcache.testing.cli import main

main()
