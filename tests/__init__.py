"""The test suite is a package (each folder too) so that test modules are imported by their full
dotted name (``tests.cli.test_cli``): files with the same name in two folders cannot collide, and
``tests.helpers`` is importable from every folder and from conftest.py."""
