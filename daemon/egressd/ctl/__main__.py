"""python -m egressd.ctl: the same as the egressctl command."""

import sys

from egressd.ctl import main

sys.exit(main())
