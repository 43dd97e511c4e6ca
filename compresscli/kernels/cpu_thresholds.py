"""Where each compiled CPU kernel beats decode + GEMM, as measured by benchmarks/kernel_thresholds.py
on Intel(R) Xeon(R) Processor, 2 cores (2 threads, torch 2.14.1+cu130, kernels built for amx).
GENERATED: do not edit; rerun the script on the target machine to re-measure (results in
benchmarks/results/kernel_thresholds.md)."""

SMALL_WEIGHTS = 2097152  # layers with at most this many dense weights are the "small" class

# structure -> dtype -> measured density -> shape class -> the most input rows for which the kernel won
KERNEL_MAX_ROWS = {
    'bitmask': {
        'bfloat16': {0.1: {"large": 32, "small": 16}, 0.25: {"large": 32, "small": 32}, 0.5: {"large": 32, "small": 32}, 0.75: {"large": 32, "small": 32}},
        'float16': {0.1: {"large": 8, "small": 4}, 0.25: {"large": 4, "small": 8}, 0.5: {"large": 2, "small": 8}, 0.75: {"large": 4, "small": 8}},
        'float32': {0.1: {"large": 8, "small": 4}, 0.25: {"large": 8, "small": 8}, 0.5: {"large": 16, "small": 16}, 0.75: {"large": 16, "small": 16}},
    },
    'condensed': {
        'bfloat16': {0.1: {"large": 64, "small": 64}, 0.25: {"large": 32, "small": 32}, 0.5: {"large": 16, "small": 32}},
        'float16': {0.1: {"large": 512, "small": 512}, 0.25: {"large": 64, "small": 64}, 0.5: {"large": 1, "small": 8}},
        'float32': {0.1: {"large": 512, "small": 512}, 0.25: {"large": 128, "small": 512}, 0.5: {"large": 64, "small": 128}},
    },
    'csr': {
        'bfloat16': {0.02: {"large": 64, "small": 64}, 0.0625: {"large": 128, "small": 128}},
        'float16': {0.02: {"large": 512, "small": 512}, 0.0625: {"large": 512, "small": 512}},
        'float32': {0.02: {"large": 512, "small": 512}, 0.0625: {"large": 512, "small": 512}},
    },
    'rps': {
        'bfloat16': {1.0: {"large": 4, "small": 4}},
        'float16': {1.0: {"large": 8, "small": 16}},
        'float32': {1.0: {"large": 16, "small": 4}},
    },
}
