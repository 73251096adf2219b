"""The benchmark harness: a fast mock upstream, a load generator, and `python -m bench` to run the scenarios."""
