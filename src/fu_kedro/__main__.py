"""Entry point for ``python -m fu_kedro``: runs the project like ``kedro run``."""
import sys
from pathlib import Path

from kedro.framework.cli.utils import find_run_command
from kedro.framework.project import configure_project


def main(*args, **kwargs):
    package_name = Path(__file__).parent.name
    configure_project(package_name)
    run = find_run_command(package_name)
    try:
        return run(*args, **kwargs)
    except SystemExit as exc:  # a run stopped by SIGINT / SIGTERM exits with 130 / 143, not 1
        from fu_kedro.run_status import exit_code

        raise SystemExit(exit_code(exc.code)) from None


if __name__ == "__main__":
    sys.exit(main())
