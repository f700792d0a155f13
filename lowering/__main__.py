"""``python -m lowering`` is the ``shardlang`` command."""

from lowering.cli import main

raise SystemExit(main())
