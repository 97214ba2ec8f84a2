import sys

from midol.cli import main

sys.exit(main())
