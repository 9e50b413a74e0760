"""``python -m tcpha.config [ROOT]``: write the reference files generated from the settings table."""

import sys

from tcpha.config.reference import main

sys.exit(main())
