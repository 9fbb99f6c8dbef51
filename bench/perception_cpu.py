"""Perception encoders on CPU, omni_jax vs the PyTorch reference on the same small random models.

    python bench/perception_cpu.py [--repeats 5] [--minutes 40]

Runs the two encoder benchmarks one after the other and prints their tables:

* `bench/audio_long.py`: the AuT audio encoder on 30 s and 5 min clips (side by side, each runtime
  in its own process) and a 40-minute audio (time and peak memory, omni_jax only).
* `bench/vision_cpu.py`: the vision encoder on a 448x448 image and an 8 s video at 2 fps.

Target (issue 3): >= 2x the reference on each input. See each script's docstring for the model sizes
and how the timings are taken.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=40.0, help="length of the long audio")
    args = parser.parse_args()
    runs = [
        [sys.executable, os.path.join(HERE, "audio_long.py"), "--repeats", str(args.repeats), "--minutes", str(args.minutes)],
        [sys.executable, os.path.join(HERE, "vision_cpu.py"), "--repeats", str(args.repeats)],
    ]
    status = 0
    for command in runs:
        print(f"$ {' '.join(os.path.relpath(c) if c.endswith('.py') else c for c in command[1:])}", flush=True)
        status |= subprocess.call(command)
    return status


if __name__ == "__main__":
    sys.exit(main())
