"""The command lines: the only code that defines flags."""
