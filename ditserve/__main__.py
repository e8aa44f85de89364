from ditserve.cluster.cli import main

raise SystemExit(main())
