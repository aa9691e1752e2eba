"""`python -m qguard_stream.cli ...`: the same as the `qguard-stream` command."""

from qguard_stream.cli import main

raise SystemExit(main())
