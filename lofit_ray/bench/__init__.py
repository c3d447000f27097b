"""What the jobs/bench_*.py scripts measure with: FLOP floors and the machine's matmul peak (flops),
the paper-style implementations the library is timed against (reference), the phase-2 lever ablation
(phase2), and small timing helpers (timing). Not used by training or search."""
