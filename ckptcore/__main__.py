"""``python -m ckptcore``: the same as the ``ckptcore`` command."""

from ckptcore.cli.main import main

raise SystemExit(main())
