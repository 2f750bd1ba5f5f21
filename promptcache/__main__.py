from promptcache.cli import main

raise SystemExit(main())
