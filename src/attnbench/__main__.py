import faulthandler

from .cli import main

faulthandler.enable()  # a crash in native code (a segfault) prints each thread's Python stack: where the stage died
raise SystemExit(main())
