import sys

from pupil.cli import main

sys.exit(main())
