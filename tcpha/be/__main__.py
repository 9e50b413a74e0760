import sys

from tcpha.cli.be import main

sys.exit(main())
