"""The commands beside training: compare, export, generate, reproduce and the benchmarks."""
