"""Plain helpers shared by the tests: importable (unlike conftest.py) and fixture-free.

- ``models``: random timm models made testable, the exported families (``FAMILIES``);
- ``masks``: how much two masks from slightly different tensors may justifiably differ;
- ``paths``: the checkout's root and ``../shared``, independent of a test file's depth.
"""
