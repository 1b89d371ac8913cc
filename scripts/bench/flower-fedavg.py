"""Time FedAvg arithmetic as Flower does it, on random float32 updates.

Flower's aggregate() multiplies every layer of every client's weights by
that client's num_examples, sums the products over clients with numpy and
divides by the total number of examples. This script does the same for one
layer of SIZE float32 values and UPDATES clients, and prints one JSON
object with the best and all wall times (data generation excluded).

Usage: python3 flower-fedavg.py --updates 100 --size 1000000 --repeats 3
"""

import argparse
import json
import time

import numpy as np


def flower_style_mean(results):
    """Return sum(weights * num_examples) / total_examples, as Flower does."""
    total_examples = sum(num_examples for _, num_examples in results)
    weighted = [weights * num_examples for weights, num_examples in results]
    return np.sum(weighted, axis=0) / total_examples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.updates < 1 or args.size < 1 or args.repeats < 1:
        parser.error("--updates, --size and --repeats must be at least 1")

    rng = np.random.default_rng(args.seed)
    results = [
        (
            rng.standard_normal(args.size, dtype=np.float32) * np.float32(0.01),
            int(rng.integers(1, 5000)),
        )
        for _ in range(args.updates)
    ]

    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        mean = flower_style_mean(results)
        seconds.append(time.perf_counter() - started)
        if mean.shape != (args.size,):
            raise RuntimeError(f"mean has shape {mean.shape}")

    print(
        json.dumps(
            {
                "numpyVersion": np.__version__,
                "updates": args.updates,
                "size": args.size,
                "dtype": str(mean.dtype),
                "secondsBest": min(seconds),
                "secondsAll": seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
