"""Run the command line as `python -m tproxy`."""

from tproxy.cli.main import main

raise SystemExit(main())
