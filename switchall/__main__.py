import sys

from switchall.cli import main

sys.exit(main())
