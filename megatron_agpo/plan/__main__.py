import sys

from megatron_agpo.plan import main

sys.exit(main())
