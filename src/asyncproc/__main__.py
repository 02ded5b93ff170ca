import sys

from asyncproc._cli import main

sys.exit(main())
