"""`python -m qguard_stream.server --model PATH` (same options as `qguard-stream serve`)."""

from qguard_stream.cli.serve import main

raise SystemExit(main())
