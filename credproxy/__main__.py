from credproxy.cli import main

raise SystemExit(main())
