"""`python -m eval`: see eval.cli."""

from eval.cli import main
from lorakit.fast_exit import exit_now

if __name__ == "__main__":
    exit_now(main())  # without Python's 1.9 s teardown of torch and diffusers (lorakit/fast_exit.py)
