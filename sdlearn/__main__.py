"""`python -m sdlearn ...`: the same as the `sdlearn` command (see sdlearn.cli)."""

from sdlearn.cli import main

raise SystemExit(main())
