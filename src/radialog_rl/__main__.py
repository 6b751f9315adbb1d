import sys

from radialog_rl.cli import main

sys.exit(main())
