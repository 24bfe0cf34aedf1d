"""Apps on top of the product: the demo, the benchmarks. Nothing imports them."""
