"""`python -m fvpatch`: the same as the `fvpatch` command."""

import sys

from fvpatch.entry import main

sys.exit(main())
