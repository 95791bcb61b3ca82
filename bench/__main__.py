"""``python -m bench``: see ``bench/harness.py``."""

from bench.harness import main

if __name__ == "__main__":
    main()
