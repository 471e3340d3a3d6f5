"""``python -m tdpipe_hf ...`` is the ``tdpipe`` command."""

from .apps.cli import main

raise SystemExit(main())
