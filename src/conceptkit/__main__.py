"""`python -m conceptkit ...`: the same as the `conceptkit` command."""
import sys

from .cli import main

sys.exit(main())
