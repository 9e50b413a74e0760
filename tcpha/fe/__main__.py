import sys

from tcpha.cli.fe import main

sys.exit(main())
