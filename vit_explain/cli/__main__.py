"""``python -m vit_explain.cli``, as when the CLI was one module (tests and benchmarks run it so)."""

from . import main

main()
