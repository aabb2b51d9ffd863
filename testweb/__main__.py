"""``python -m crawlfleet.testweb``: the same as ``crawlfleet testweb``."""

from .cli import main

raise SystemExit(main())
