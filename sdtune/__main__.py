"""`python -m sdtune ...` is the `sdtune` command."""

import sys

from sdtune.command import main

sys.exit(main())
