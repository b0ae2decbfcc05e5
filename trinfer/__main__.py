"""`python -m trinfer ...` is the `trinfer` command."""
import sys

from trinfer.cli import main

sys.exit(main())
