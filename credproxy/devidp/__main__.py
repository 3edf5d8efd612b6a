"""``python -m credproxy.devidp``: see :mod:`credproxy.devidp.cli`."""

from credproxy.devidp.cli import main

raise SystemExit(main())
