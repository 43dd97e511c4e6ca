"""Where each compiled CPU kernel beats decode + GEMM, as measured by benchmarks/kernel_thresholds.py
on Intel(R) Xeon(R) Processor, 2 cores (2 threads, torch 2.14.1+cu130, kernels built for avx512-bf16).
GENERATED: do not edit; rerun the script on the target machine to re-measure (results in
benchmarks/results/kernel_thresholds.md)."""

SMALL_WEIGHTS = 2097152  # layers with at most this many dense weights are the "small" class

# structure -> dtype -> measured density -> shape class -> the most input rows for which the kernel won
KERNEL_MAX_ROWS = {
    'bitmask': {
        'bfloat16': {0.1: {"large": 16}, 0.25: {"large": 16}, 0.5: {"large": 16}, 0.75: {"large": 16}},
    },
    'condensed': {
        'bfloat16': {0.1: {"large": 128}, 0.25: {"large": 32}, 0.5: {"large": 32}},
    },
}
