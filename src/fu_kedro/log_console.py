"""The console Kedro's log handler writes to (``conf/logging.yml``): stderr.

Kedro's default rich handler prints to stdout, mixing its log lines with what a command prints
(``kedro lineage`` printed 61 log lines before its tree). ``conf/logging.yml`` keeps Kedro's
handler and points it at this console, so stdout holds only a command's own output.
"""
from rich.console import Console

STDERR = Console(stderr=True)
