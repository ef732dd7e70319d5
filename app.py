#!/usr/bin/env python3
"""EMICA Realtime: `python app.py --help`."""

import sys

from realtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
