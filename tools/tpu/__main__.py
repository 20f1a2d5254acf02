import sys

from tools.tpu.pod import main

sys.exit(main())
