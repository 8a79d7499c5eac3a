import sys

from mmrobust.cli import main

sys.exit(main())
