"""``python -m sqdf ...`` is the ``sqdf`` command (what ``torchrun -m`` and
``accelerate launch -m`` start)."""

from sqdf.cli import run

if __name__ == "__main__":
    run()
