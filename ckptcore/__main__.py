"""``python -m ckptcore``: the same as the ``ckptcore`` command."""

from ckptcore.cli import main

raise SystemExit(main())
