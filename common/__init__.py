"""What every part of the project shares: files written whole or not at all
(atomic.py) and --help that shows every default (help_format.py)."""
