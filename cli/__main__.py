"""`python -m cli`: the `driffusion` command."""
import sys

from cli import main

sys.exit(main())
