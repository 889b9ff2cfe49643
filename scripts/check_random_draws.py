#!/usr/bin/env python3
"""Checks that nothing but the noise stream draws from libtorch's CPU generator.

The generator is global to the process: a job holds the stream's lock from its seed to
its last draw, so that no other draw interleaves (architecture invariant 2). A draw or a
reseed elsewhere — in the server, or in a test running beside a generation in the same
test binary — moves that job's noise without taking the lock. Every draw goes through
`sdxld::engine::noise::NoiseStream` (tests: `common::random_normal`/`random_unit`).

Usage: check_random_draws.py DIR... ; exits 1 naming each offending line.
"""

import re
import sys
from pathlib import Path

# libtorch calls that read or reset the default CPU generator.
DRAWS = re.compile(
    r"Tensor::(rand|randn|randint|randperm|rand_like|randn_like|randint_like|normal|bernoulli)\b"
    r"|\bmanual_seed\b"
    r"|\.(uniform_|normal_|bernoulli_|random_|exponential_|cauchy_|log_normal_|geometric_)\("
    r"|\.(multinomial|dropout|rrelu|randn_like|rand_like)\("
)

# The one module that owns the stream.
OWNER = Path("src/engine/noise.rs")


def offending_lines(roots):
    for root in roots:
        for path in sorted(Path(root).rglob("*.rs")):
            if path == OWNER:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("//", 1)[0]
                if DRAWS.search(code):
                    yield f"{path}:{number}: {line.strip()}"


def main():
    found = list(offending_lines(sys.argv[1:] or ["src", "tests", "benches"]))
    for line in found:
        print(line)
    if found:
        print("draws from libtorch's global generator outside the noise stream: "
              "use NoiseStream (tests: common::random_normal / random_unit)")
        return 1
    print("check_random_draws: every random draw goes through the noise stream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
