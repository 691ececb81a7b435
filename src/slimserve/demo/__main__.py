"""`python -m slimserve.demo`."""

import sys

from slimserve.demo import main

sys.exit(main())
