"""`python -m ta_opd_verl.diagnose` = `ta-opd diagnose`."""

import sys

from ta_opd_verl.diagnose.main import main

sys.exit(main())
