"""`python -m recallk` runs the command line."""

from recallk.cli import main

raise SystemExit(main())
